"""Meshes from config, and the one table that maps logical axis names to mesh axes.

Every parameter and key activation names its dimensions logically ("batch",
"embed", "mlp", ...). `rules` is an ordered list of (logical name, mesh axes);
the first rule for a name whose mesh axes are still free in that array wins, so
an activation ("batch", "length", "embed") leaves "embed" unsharded when
"batch" has already taken "fsdp". This module knows mesh axes and logical
names, never a model class.
"""
import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axes in device order: the last varies fastest, so "tensor" (the most
# communication-heavy) lands on neighbouring devices.
MESH_AXES = ("data", "expert", "fsdp", "tensor")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """{axis: size} for every mesh axis (absent ones 1), the single -1 replaced by the
  remaining devices. The one check of config.mesh: validation and make_mesh both
  call it, and its ValueErrors name the field and the fix."""
  for axis in mesh_cfg:
    size = mesh_cfg[axis]
    if axis not in MESH_AXES:
      raise ValueError(f"config.mesh.{axis}: is not a mesh axis. Use the axes {MESH_AXES}.")
    if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}: must be a positive size or -1, got {size!r}. "
                       "Use a size >= 1, or -1 for the remaining devices.")
  sizes = {a: mesh_cfg[a] if a in mesh_cfg else 1 for a in MESH_AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh: more than one axis is -1 ({rest}). "
                     "Set at most one axis to -1.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(
          f"config.mesh: the fixed axes multiply to {known}, which does not divide "
          f"the {num_devices} devices. Change the sizes so that -1 can take the rest.")
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"config.mesh: axis sizes {sizes} multiply to {known} but there are "
        f"{num_devices} devices. Make them multiply to {num_devices} or set one to -1.")
  return sizes


def make_mesh(mesh_cfg: dict, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with Auto axis types: GSPMD propagates shardings between constraints."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules) -> PartitionSpec:
  """Maps logical dimension names to a PartitionSpec: first free match wins."""
  used: set[str] = set()
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
        if not used.intersection(axes):
          choice = axes
          break
      if not matched:
        raise ValueError(f"Logical axis {name!r} has no entry in config.sharding_rules; "
                         f"add a rule such as [{name!r}, None].")
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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without a mesh."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} names {logical_axes} for an "
                     f"array of rank {x.ndim}.")
  spec = logical_to_spec(logical_axes, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def logical_axes_of(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def state_shardings(state, mesh: Mesh, rules):
  """NamedShardings for an nnx.State from each Variable's logical names."""

  def one(v):
    if isinstance(v, nnx.Variable):
      names = logical_axes_of(v)
      spec = logical_to_spec(names, rules) if names else PartitionSpec()
      return v.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_mesh_axes(rules) -> tuple:
  """The mesh axes a batch's rows are split over under `rules`."""
  return _as_tuple(logical_to_spec(("batch",), rules)[0])


def data_parallel_size(mesh_shape, rules) -> int:
  """How many slices a batch is split into ({axis: size} or mesh.shape): validation
  checks that batches divide by it, decoding pads its rows to a multiple of it."""
  return math.prod(mesh_shape[a] for a in batch_mesh_axes(rules))
