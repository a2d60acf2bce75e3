"""Meshes from config, and the one table that maps logical axis names to mesh axes.

The mesh axes are declared by the config (`config.mesh_axes`, in device order;
`config.mesh` gives their sizes), so a new axis ("sequence", "pipeline") is a
config and rules change, not an edit of this module.

Every parameter and key activation names its dimensions logically. Parameters
use "embed", "mlp", "heads", "kv", "vocab", "exp", ...; activations have names
of their own ("activation_batch", "activation_embed", ...), each with its own
rule, so editing how parameters shard never reshards activations, and back.

Resolution (`logical_to_spec`), for `rules`, an ordered list of (logical name,
mesh axes):
  * dimensions are resolved left to right, and a mesh axis taken by one
    dimension is not available to the dimensions to its right (left-most wins);
  * for one dimension, the first rule of its name whose mesh axes are all still
    free wins; a name may have several rules, tried in order (the MoE tensors
    (activation_exp, activation_batch, ...) fall through to the second
    activation_batch rule because "expert" is taken);
  * a name with no rule is an error; a rule's mesh axes that the mesh lacks
    (a mesh built without a config, e.g. in tests) count as size 1 and are dropped.
Unlike flax/t5x, where the order of the rules decides between dimensions, here
the order of the dimensions does. With activation names of their own, only the
expert-sharded MoE tensors rely on it: activation_exp, left of activation_batch,
takes "expert" first.
This module knows mesh axes and logical names, never a model class.
"""
import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bigjax.errors import ConfigError


def top_k_per_shard(values: jax.Array, k: int, mesh: Mesh, rows: PartitionSpec):
  """jax.lax.top_k over the last axis, run on each shard of the rows (`rows`: the
  leading axis's spec): XLA's partitioner would all-gather a TopK's operand to
  every device, though each row's top k needs that row alone."""
  return jax.shard_map(lambda v: tuple(jax.lax.top_k(v, k)), mesh=mesh, in_specs=rows,
                       out_specs=(rows, rows))(values)


def resolve_mesh_shape(mesh_cfg, num_devices: int, axes) -> dict:
  """{axis: size} for every axis of `axes` (config.mesh_axes; absent sizes are 1),
  the single -1 replaced by the remaining devices. The one check of config.mesh:
  validation and make_mesh both call it, and its ValueErrors name the field and
  the fix."""
  axes = tuple(axes)
  for axis in mesh_cfg:
    size = mesh_cfg[axis]
    if axis not in axes and size == 1:
      continue  # An axis left out of mesh_axes: size 1 is what leaving it out means.
    if axis not in axes:
      raise ValueError(f"config.mesh.{axis}: is not a mesh axis. Use the axes {axes}, or "
                       "declare it in config.mesh_axes (and give it sharding rules).")
    if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}: must be a positive size or -1, got {size!r}. "
                       "Use a size >= 1, or -1 for the remaining devices.")
  sizes = {a: mesh_cfg[a] if a in mesh_cfg else 1 for a in axes}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh: more than one axis is -1 ({rest}). "
                     f"Set at most one axis to -1, e.g. --config.mesh.{rest[0]}=1 (the "
                     "default mesh gives data the remaining devices).")
  known = math.prod(s for s in sizes.values() if s != -1)
  # Too few devices on a CPU host: XLA can split it into more.
  more = (f" On CPU, XLA_FLAGS=--xla_force_host_platform_device_count={known} gives "
          f"{known} devices." if known > num_devices and jax.default_backend() == "cpu"
          else "")
  if rest:
    if num_devices % known:
      raise ValueError(
          f"config.mesh: the fixed axes multiply to {known}, which does not divide "
          f"the {num_devices} devices. Change the sizes so that -1 can take the rest.{more}")
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"config.mesh: axis sizes {sizes} multiply to {known} but there are "
        f"{num_devices} devices. Make them multiply to {num_devices} or set one to -1.{more}")
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None,
              axes: Sequence[str] | None = None) -> Mesh:
  """A mesh with Auto axis types: GSPMD propagates shardings between constraints.
  `axes`: the axis names in device order, the last varying fastest (a config's
  mesh_axes, see `config_mesh`); None: the keys of `mesh_cfg` in its order."""
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(mesh_cfg) if axes is None else tuple(axes)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices), axes)
  shape = tuple(sizes[a] for a in axes)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def config_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh a config declares: axes config.mesh_axes, sizes config.mesh."""
  return make_mesh(config.mesh, devices, config.mesh_axes)


def check_rows_per_process(batch_sharding: NamedSharding, batch_size: int,
                           process_index: int, process_count: int,
                           local_devices: Sequence[Any] | None = None):
  """The input pipeline gives each process its own B/P rows of every global
  batch (pipeline.per_process), which jax places at the rows the process's
  devices hold. That needs those to be one block of B/P rows, as when the batch
  axes span the processes (on a TPU slice the block may be another process's
  index: the batch's rows are then permuted, the same examples). Where they do
  not (tensor parallelism across hosts, say), jax would take the processes'
  different rows for copies of one array. Raises a ConfigError then."""
  if local_devices is None:
    local_devices = [d for d in batch_sharding.device_set if d.process_index == process_index]
  index = batch_sharding.devices_indices_map((batch_size,))
  held = sorted({r for d in local_devices for r in range(*index[d][0].indices(batch_size))})
  share = batch_size // process_count
  if len(held) != share or held[-1] - held[0] != share - 1:
    mesh = batch_sharding.mesh
    raise ConfigError(
        f"config.mesh / config.mesh_axes: the devices of process {process_index} hold "
        f"rows {held[0]}..{held[-1]} of each batch of {batch_size} on the mesh "
        f"{dict(mesh.shape)}, but each of the {process_count} processes reads its own "
        f"{share} rows. Make the batch's axes (the activation_batch rule: "
        f"{batch_sharding.spec[0]}) span the processes, outermost in config.mesh_axes.")


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Maps logical dimension names to a PartitionSpec (see the module docstring for
  the priority). `mesh_axes`: the mesh's axes; rule axes outside it are dropped."""
  used: set[str] = set()
  present = None if mesh_axes is None else set(mesh_axes)
  out = []
  for name in logical_axes:
    choice = None
    if name is not None:
      matched = False
      for rule_name, mesh_axes in rules:
        if rule_name != name:
          continue
        matched = True
        axes = _as_tuple(mesh_axes)
        if present is not None:
          axes = tuple(a for a in axes if a in present)
        if not used.intersection(axes):
          choice = axes
          break
      if not matched:
        raise ConfigError(f"config.sharding_rules: logical axis {name!r} has no entry; add "
                          f"a rule such as ({name!r}, None) (replicated).")
    if choice:
      used.update(choice)
      out.append(choice[0] if len(choice) == 1 else choice)
    else:
      out.append(None)
  return PartitionSpec(*out)


# The mesh and rules in force while tracing a model (None: no constraints).
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("bigjax_sharding", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules):
  token = _CONTEXT.set((mesh, [tuple(r) for r in rules]))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def active_mesh_rules():
  """(mesh, rules) in force while tracing (use_mesh_rules), or None."""
  return _CONTEXT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without a mesh."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} names {logical_axes} for an "
                     f"array of rank {x.ndim}.")
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, rules))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh.axis_names))


def logical_axes_of(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def state_shardings(state, mesh: Mesh, rules):
  """NamedShardings for an nnx.State from each Variable's logical names."""

  def one(v):
    if isinstance(v, nnx.Variable):
      return v.replace(named_sharding(mesh, logical_axes_of(v) or (), rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


BATCH = ("activation_batch",)  # The logical name of a batch's rows.


def batch_mesh_axes(rules, mesh_axes: Sequence[str] | None = None) -> tuple:
  """The mesh axes a batch's rows are split over under `rules`."""
  return _as_tuple(logical_to_spec(BATCH, rules, mesh_axes)[0])


def data_parallel_size(mesh_shape, rules) -> int:
  """How many slices a batch is split into ({axis: size} or mesh.shape): validation
  checks that batches divide by it, decoding pads its rows to a multiple of it."""
  return math.prod(mesh_shape[a] for a in batch_mesh_axes(rules, tuple(mesh_shape)))
