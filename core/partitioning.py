"""The device mesh, the ONE table that maps logical axis names to mesh axes, and parameters
created with logical axes. Imports nothing of the project.

Every parameter is created through `param(...)`, which records its logical axis names
(`('embed', 'mlp')`, ...) in its `out_sharding` metadata, and activations are constrained
with `constrain(x, names)`. `RULES` below turns
those names into mesh axes of the 4-axis mesh `('data', 'fsdp', 'expert', 'tensor')`.
Changing the parallel layout is a config change (`mesh.*`), never a model change.

Layout in words:
  * the batch is split over data x fsdp x expert (attention treats `expert` as a batch axis,
    so no device idles outside the MoE layers);
  * parameters are split over `fsdp` on their model dimension (ZeRO-3 style: gathered per
    layer by XLA) and over `tensor` on heads / FFN hidden / vocab (Megatron style);
  * stacked experts are split over `expert`.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'norm': None,
    'expert': 'expert',
    'modality': None,
    # activations
    'batch': BATCH_AXES,
    'length': None,
    'act_embed': None,
    'act_heads': 'tensor',
    'act_kv_heads': 'tensor',
    'act_mlp': 'tensor',
    'act_vocab': 'tensor',
}


def logical_to_spec(names: Sequence[str | None]) -> P:
  """Logical axis names -> PartitionSpec over MESH_AXES, through RULES."""
  spec, used = [], set()
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in RULES:
      raise KeyError(f'logical axis {name!r} has no rule in core/partitioning.py RULES')
    axes = RULES[name]
    axes_t = (axes,) if isinstance(axes, str) else (axes or ())
    clash = used.intersection(axes_t)
    if clash:
      raise ValueError(f'logical axes {tuple(names)} map mesh axis {clash} twice')
    used.update(axes_t)
    spec.append(axes)
  return P(*spec)


def param(rngs: nnx.Rngs, init: nnx.initializers.Initializer, shape: Sequence[int],
          axes: Sequence[str], dtype) -> nnx.Param:
  """A parameter with logical axis names (lazy: sharded later through RULES)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


def fan_in_init(fan_in: int) -> nnx.initializers.Initializer:
  """Truncated normal with std 1/sqrt(fan_in), for weights whose fan-in spans several axes."""
  return nnx.initializers.truncated_normal(stddev=fan_in ** -0.5)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on logical names; a no-op outside a mesh context (unit tests)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def manual_axes() -> frozenset[str]:
  """The current mesh's axes of size > 1 (the ones `per_shard` makes manual); empty with
  one device or outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return frozenset() if mesh.empty else frozenset(
      a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1)


def per_shard(fn, in_names, out_names):
  """fn(*arrays, collectives) per batch shard: `jax.shard_map` over the mesh axes of size
  > 1 (`collectives`: their names; collectives over the others would be copies), or a plain
  call when there are none (one device, or no mesh). Names are logical axes (RULES); the
  per-shard bodies reach the weights' shards with `gather_fsdp` and `psum_tensor` (MoT's
  and Mixture-of-Mamba's modality-untied projections: each device sorts its own rows)."""
  manual = manual_axes()
  if not manual:
    return lambda *a: fn(*a, collectives=manual)

  def spec(names):  # the logical spec without the size-1 (automatic) axes
    keep = lambda axes: tuple(x for x in axes if x in manual) or None  # noqa: E731
    return P(*(keep((e,) if isinstance(e, str) else e) if e is not None else None
               for e in logical_to_spec(names)))
  out = (tuple(spec(n) for n in out_names) if isinstance(out_names[0], tuple)
         else spec(out_names))
  return jax.shard_map(lambda *a: fn(*a, collectives=manual), axis_names=manual,
                       in_specs=tuple(spec(n) for n in in_names), out_specs=out)


def gather_fsdp(w, axis: int, collectives):
  """Inside `per_shard`: the whole of w's `axis` (an 'embed' axis, sharded over fsdp)."""
  return jax.lax.all_gather(w, 'fsdp', axis=axis, tiled=True) if 'fsdp' in collectives else w


def psum_tensor(y, collectives):
  """Inside `per_shard`: the sum of a row-parallel product's partial sums over 'tensor'."""
  return jax.lax.psum(y, 'tensor') if 'tensor' in collectives else y


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """`mesh.{data,fsdp,expert,tensor}` with at most one -1 (= all remaining) -> sizes."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  bad = [f'mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f'mesh sizes must be positive or -1 (all remaining): {", ".join(bad)}')
  if sizes.count(-1) > 1:
    raise ValueError('at most one of mesh.{data,fsdp,expert,tensor} may be -1, got '
                     + ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes)))
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the '
                       f'{num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} multiplies to '
                     f'{math.prod(sizes)} devices, but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of an input array's leading (batch) axis, any rank ([B, T] tokens, [B, H, W, C]
  images, [B] labels): the other axes replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch',)))


def shard_batch(batch, batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """Process-local numpy arrays [B_local, ...] -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in batch.items()}


def tree_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """NamedShardings for an nnx.State whose Variables carry logical `out_sharding` names."""

  def one(v):
    names = getattr(v, 'out_sharding', None)
    if names is None:
      names = (None,) * v.get_value().ndim
    return v.replace(NamedSharding(mesh, logical_to_spec(names)))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
