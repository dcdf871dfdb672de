# Two commands on a fresh machine:  make train  |  make test
# The stack needs Python >= 3.12 (tokamax, jax 0.11): PYTHON=/path/to/python3.12 picks one;
# otherwise the first of python3.12, python3.13, python3.14, python3 (and pyenv's installed
# versions) that runs and is >= 3.12.
ifndef PYTHON
PYTHON := $(shell for p in python3.12 python3.13 python3.14 python3 \
  $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; \
  done)
endif
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/moma.py:tiny
WORKDIR ?= runs/default

.PHONY: train eval test bench venv clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	@test -x $(PY) || test -n "$(PYTHON)" || { echo "make: no Python >= 3.12 found (tried" \
	  "python3.12, python3.13, python3.14, python3, pyenv versions); install one or pass" \
	  "PYTHON=/path/to/python3.12" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { \
	  echo "make: PYTHON=$(PYTHON) is $$($(PYTHON) --version 2>&1); the stack needs" \
	  "Python >= 3.12" >&2; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || rm -rf $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Prepares the embedded dataset on first use, trains, then evaluates the final checkpoint.
# MoMa configs also train their auxiliary routers (stage aux, main model frozen) so that
# eval.json reports the causal-inference loss next to the batch-routing one.
train: venv
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	case "$(CONFIG)" in \
	  configs/moma.py:*) $(PY) train.py --config=$(CONFIG),stage=aux --workdir=$(WORKDIR) ;; \
	  configs/moma.py) $(PY) train.py --config=$(CONFIG):tiny,stage=aux --workdir=$(WORKDIR) ;; \
	esac
	$(PY) eval.py --config=$(CONFIG) --workdir=$(WORKDIR)

eval: venv
	$(PY) eval.py --config=$(CONFIG) --workdir=$(WORKDIR)

# pytest on 8 fake CPU devices (tests/conftest.py sets them up), in TEST_WORKERS pytest-xdist
# processes (2: the suite is mostly single-threaded XLA compiles; ~27 min on 2 cores, with
# one persistent compilation cache per run: `bash .ci/run` from a fresh clone, 2026-12-02:
# 658 tests in 1525 s, 27 min with the venv, beside a niced training run; later that day
# 662 tests in 3043 s, 52 min, on cores shared with 1b dry-run compiles and a training
# sweep; 673 tests in 3207 s beside the η sweep's training: the suite's own time is the
# first figure plus ~2-3 min of tests since).
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: venv
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs
