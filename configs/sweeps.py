"""Sweeps that measure eta, the factor of training FLOPs a dense model needs to match a
sparse one (MoMa's metric; docs/eta.md). Plain data: `sweep.py` (training/sweep.py) turns a
preset into runs, checks equal active FLOPs per token, trains, evaluates and reports.

  python sweep.py --sweep=tiny --dry_run          # the plan, FLOPs check, time estimate
  python sweep.py --sweep=tiny --seeds=2 --out=runs/eta_tiny   # resumes when re-run

A preset: its runs (`runs`, default RUNS: the dense transformer curve and the sparse
families; MAMBA_RUNS: dense Mamba and Mixture-of-Mamba); every run trains `base_steps`
steps (the 1x compute point) except the dense curve, which trains at `base_steps * m` for m in `dense_multipliers` (separate runs, each
with its own full schedule; warmup = warmup_fraction of the run's steps). Sparse runs and
the norm control must be within 1% of the dense model's active training FLOPs per token;
`match` names a width key the plan solves for that (after adding layers while under the
dense FLOPs: mixture-of-depths). `run_overrides` adds `--config.` overrides per run (e.g. a
learning rate); `overrides` applies to every run. η can only be read inside the dense
range: beyond it the report gives a bound (e.g. ">4").

To tune the budget: `base_steps` (and `dense_multipliers`); `python sweep.py --dry_run`
prints the estimated time. Changing a budget changes the runs' configs: use a new --out.
"""

# One run: name, kind, config file, variant string ('{size}' and ',data=...' are added).
#   kind: dense (the curve; one run per multiplier) | sparse | control (norm placement) |
#         capacity (a wider dense model at the 1x token budget, not FLOPs-matched)
#   speed: the throughput class for time estimates (runs of one class share a step time)
RUNS = (
    dict(name='dense', kind='dense', config='dense.py', variants='', speed='dense'),
    dict(name='moma_4t4i', kind='sparse', config='moma.py', variants='groups=4t4i,norm=pre',
         speed='moma_4t4i'),
    dict(name='moe_8x_ec', kind='sparse', config='moe.py',
         variants='experts=8,router=expert_choice,every=1', speed='moe_ec'),
    dict(name='moma_1t1i', kind='sparse', config='moma.py', variants='groups=1t1i,norm=pre',
         speed='moma_1t1i'),
    dict(name='mod_moma_4t4i', kind='sparse', config='moma.py',
         variants='groups=4t4i,norm=pre,mod=1', speed='mod_moma_4t4i',
         match='model.moma.mlp_dim'),
    dict(name='mot_all', kind='sparse', config='mot.py', variants='untie=all,norm=pre',
         speed='mot'),
    dict(name='mot_ffn', kind='sparse', config='mot.py', variants='untie=ffn,norm=pre',
         speed='mot_ffn'),
    # MoT with nothing untied = the dense model with res-post norm: only the norm moves.
    dict(name='control_res_post', kind='control', config='mot.py',
         variants='untie=none,norm=res_post', speed='mot_none'),
    dict(name='dense_wide', kind='capacity', config='dense.py', variants='',
         speed='dense'),
)

# Mixture-of-Mamba's η (docs/mamba.md): dense Mamba (configs/mamba.py) is the curve, the
# modality-untied variants the sparse runs (untying adds parameters, not FLOPs per token). A
# preset takes these with `runs=MAMBA_RUNS`.
MAMBA_RUNS = (
    dict(name='mamba', kind='dense', config='mamba.py', variants='', speed='mamba'),
    dict(name='mom_all', kind='sparse', config='mamba.py', variants='untie=all', speed='mom'),
    dict(name='mom_in_out', kind='sparse', config='mamba.py', variants='untie=in,out',
         speed='mom_in_out'),
)

# Dense curve points trained after the sparse runs of a seed (the most expensive ones), so a
# partial sweep has the 1x comparison early.
LATE_MULTIPLIERS = (4,)

PRESETS = {
    # 2-core CPU: 2 seeds in ~4.5 hours (the dry run prints the estimate).
    'tiny': dict(
        size='tiny', data='scenes/g3_k128', device='cpu', seeds=2,
        base_steps=400,
        dense_multipliers=(0.25, 0.5, 1, 2, 4),
        warmup_fraction=0.05,
        overrides={'log_every': 25, 'checkpoint_every': 100},
        run_overrides={
            # 1.5x width, same head size: ~2.2x the FLOPs per token.
            'dense_wide': {'model.embed_dim': 192, 'model.num_heads': 6,
                           'model.num_kv_heads': 6, 'model.head_dim': 32,
                           'model.mlp_dim': 768},
        },
    ),
    # Mixture-of-Mamba against a dense-Mamba curve, the `tiny` preset's budget and data
    # (2-core CPU: 2 seeds in ~9 hours; the dry run prints the estimate).
    'mamba_tiny': dict(
        size='tiny', data='scenes/g3_k128', device='cpu', seeds=2,
        base_steps=400,
        dense_multipliers=(0.25, 0.5, 1, 2, 4),
        warmup_fraction=0.05,
        overrides={'log_every': 25, 'checkpoint_every': 100},
        runs=MAMBA_RUNS,
    ),
    # GPUs (written and estimated, not run on the 2-core CPU).
    'small': dict(
        size='small', data='scenes/g3_k128', device='gpu', seeds=3,
        base_steps=4_000,
        dense_multipliers=(0.25, 0.5, 1, 2, 4),
        warmup_fraction=0.05,
        overrides={'log_every': 100, 'checkpoint_every': 1_000},
        run_overrides={
            'dense_wide': {'model.embed_dim': 1024, 'model.num_heads': 16,
                           'model.num_kv_heads': 16, 'model.head_dim': 64,
                           'model.mlp_dim': 4096},
        },
    ),
}

# Time estimates when OUT has no measured run of a speed class yet: the dense model's model
# FLOP/s (training/flops.py accounting) on the preset's device, times each class's step
# time relative to dense at equal active FLOPs. CPU: a dense tiny step at batch 32 x 224
# tokens takes ~0.95 s on the 2-core CPU (~60 GFLOP/s); ratios from docs/moma.md,
# docs/mot.md, docs/moe.md and training runs (MoMa 4t4i ~2x in training); Mamba: its step
# time over dense tiny's (3.2, docs/mamba.md) at 0.73x dense's FLOPs per token, Mixture-of-
# Mamba 1.09x that (untie=in,out assumed the same). GPU: an assumed
# 100 TFLOP/s for dense small (float32 = TF32 on one H100/H200-class GPU, not measured
# here), ratios from the MoMa paper's 435M throughputs and docs/moe.md's H100 tiny steps.
DENSE_FLOPS_PER_S = {'cpu': 60e9, 'gpu': 100e12}
STEP_TIME_RATIO = {
    'cpu': {'dense': 1.0, 'moe_ec': 1.5, 'moma_1t1i': 1.0, 'moma_4t4i': 2.0,
            'mod_moma_4t4i': 2.0, 'mot': 1.1, 'mot_ffn': 1.05, 'mot_none': 1.07,
            'mamba': 4.4, 'mom': 4.8, 'mom_in_out': 4.8},
    'gpu': {'dense': 1.0, 'moe_ec': 1.3, 'moma_1t1i': 1.1, 'moma_4t4i': 1.5,
            'mod_moma_4t4i': 1.6, 'mot': 1.15, 'mot_ffn': 1.1, 'mot_none': 1.1},
}
# Per run (train + eval processes): start-up, compilation, checkpoints, evaluation.
RUN_OVERHEAD_S = {'cpu': 45, 'gpu': 120}

# Active training FLOPs per token of every sparse / control run vs dense: at most this far.
FLOPS_TOLERANCE = 0.01
