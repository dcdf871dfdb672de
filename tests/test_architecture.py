"""The shape of the codebase (docs/architecture.md): layers that import one way, shared code
that never asks which family or stage it runs, and a new family added through the registry
alone."""

import ast
import dataclasses
import os
import re

import numpy as np
import pytest

from core import partitioning
from models import dense, families, transformer
from models.family import Family
from tests.helpers import tiny_config
from training import evaluate, loop, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower layers never import higher ones: data -> configs -> core -> moe -> models -> training
# -> projects -> the entry points (trainers.py, train.py, eval.py, sweep.py).
LAYERS = ('data', 'configs', 'core', 'moe', 'models', 'training', 'projects', '')
ENTRY_POINTS = ('trainers', 'train', 'eval', 'sweep')
PACKAGES = LAYERS[:-1]


def _modules():
  """{module name: path} of every project module (not tests, benchmarks)."""
  out = {}
  for package in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, '.')
          out[rel.removesuffix('.__init__')] = os.path.join(dirpath, f)
  for name in ENTRY_POINTS:
    out[name] = os.path.join(ROOT, f'{name}.py')
  return out


def _imports(path: str, modules) -> list[tuple[str, bool]]:
  """(imported project module, at module level?) for each import in the file."""
  tree = ast.parse(open(path).read())
  top = set(map(id, tree.body))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name:
        found.append((name, id(node) in top))
  return found


def _layer(module: str) -> int:
  head = module.split('.')[0]
  return LAYERS.index(head if head in PACKAGES else '')


def test_imports_go_one_way_without_cycles_or_function_level_dodges():
  modules = _modules()
  graph, problems = {}, []
  for name, path in modules.items():
    deps = _imports(path, modules)
    graph[name] = {d for d, _ in deps if d != name}
    for dep, at_top in deps:
      if _layer(dep) > _layer(name):
        problems.append(f'{name} imports {dep} (a higher layer)')
      if name.startswith('core') and not dep.startswith('core'):
        problems.append(f'{name} imports {dep}: core imports nothing of the project')
      if not at_top and name not in ENTRY_POINTS:
        problems.append(f'{name} imports {dep} inside a function')
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        problems.append('import cycle: ' + ' -> '.join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not problems, '\n'.join(problems)


SHARED = ('training', 'models/transformer.py', 'models/family.py', 'models/families.py')
BRANCH = re.compile(r"""family\s*[!=]=|[!=]=\s*['"](aux|main)['"]|stage\s*[!=]="""
                    r"""|\.(moe|moma|mot|mod)\b""")


def test_shared_code_never_asks_which_family_or_stage_it_runs():
  """No family-name or stage comparison, and no reach into a family's own spec fields, in
  the shared training code and the decoder (warm_start's upcycling initialiser works on the
  MoMa spec it upcycles into, by nature)."""
  hits = []
  for entry in SHARED:
    path = os.path.join(ROOT, entry)
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith('.py')]
             if os.path.isdir(path) else [path])
    for f in files:
      if f.endswith('warm_start.py'):
        continue
      for i, line in enumerate(open(f), 1):
        code = line.split('#')[0]
        if BRANCH.search(code) and not code.strip().startswith(('"', "'")):
          hits.append(f'{os.path.relpath(f, ROOT)}:{i}: {line.strip()}')
  assert not hits, '\n'.join(hits)


def test_a_new_family_needs_only_its_module_and_the_registry_line(data_dir, tmp_path,
                                                                  monkeypatch):
  """A toy family (dense blocks whose FFN is half as wide, its spec in `ext`) registered in
  FAMILIES trains, counts its parameters and evaluates through the shared code."""

  def block(spec, layer, rngs):
    return dense.Block(dataclasses.replace(spec, mlp_dim=spec.ext['mlp_dim']), rngs=rngs)

  def layer_params(spec, layer, active):
    return dense.layer_params(dataclasses.replace(spec, mlp_dim=spec.ext['mlp_dim']), layer,
                              active)

  toy = Family(name='toy', block=block, layer_params=layer_params,
               spec_fields=lambda model_cfg, stage: {'ext': {'mlp_dim': model_cfg.mlp_dim // 2}})
  monkeypatch.setitem(families.FAMILIES, 'toy', toy)
  config = tiny_config(**{'model.family': 'toy', 'data.data_dir': data_dir,
                          'total_steps': 4, 'warmup_steps': 1, 'log_every': 2,
                          'checkpoint_every': 4, 'eval.num_examples': 16})
  spec = state_lib.model_spec(config)
  params = state_lib.init_state(config, state_lib.state_layout(
      config, partitioning.make_mesh(config.mesh)))['params']
  assert state_lib.count_params(params) == transformer.param_count(spec)
  assert params['blocks'][0]['ffn']['w_up'][...].shape == (64, 64)  # half of mlp_dim 128
  scalars = loop.train(config, str(tmp_path))
  assert np.isfinite(scalars['train/loss'])
  report = evaluate.evaluate(config, str(tmp_path))
  assert set(report['modalities']) == {'text', 'image'}
  with pytest.raises(ValueError, match="model.family='nope' is not a decoder family"):
    families.get('nope')
