"""Parameter names of scanned and unscanned block stacks, and conversion between them.

An unscanned stack keeps block i at `<stack>/blocks/<i>/...`. A scanned stack
(`model.scan_layers`) keeps its blocks as one repeating unit of k blocks (k = 1,
or model.moe_every when dense and MoE blocks alternate) whose parameters are
stacked along a leading `layers` axis of num_layers / k units:
`<stack>/scanned/<j>/...` row u is block u * k + j.

Everything that names parameters to a user speaks of blocks (`optim.freeze`,
`init_from.skip`, the parameters init_from reports): `block_names` gives the
per-block names of a stacked parameter, so a regex written for one layout
selects the same blocks in the other.
"""
import re

import jax.numpy as jnp
import numpy as np

_STACKED = re.compile(r"^(?P<stack>.+)/scanned/(?P<j>\d+)/(?P<rest>.+)$")


def is_stacked(name: str) -> bool:
  """Whether a parameter path ('decoder/scanned/0/attn/query') is a stacked one."""
  return _STACKED.match(name) is not None


def unit_sizes(names) -> dict:
  """{stack prefix: blocks per scanned unit} over the stacked names among `names`."""
  sizes = {}
  for name in names:
    m = _STACKED.match(name)
    if m:
      sizes[m["stack"]] = max(sizes.get(m["stack"], 0), int(m["j"]) + 1)
  return sizes


def block_names(name: str, num_units: int, sizes: dict) -> list[str] | None:
  """The per-block names of the rows of stacked parameter `name` (None: not stacked)."""
  m = _STACKED.match(name)
  if m is None:
    return None
  k, j = sizes[m["stack"]], int(m["j"])
  return [f"{m['stack']}/blocks/{u * k + j}/{m['rest']}" for u in range(num_units)]


def per_block(shapes: dict) -> dict:
  """{per-block name: (stored name, row or None)} for a flat {name: shape} of
  either layout: where each block's parameter lives."""
  sizes = unit_sizes(shapes)
  out = {}
  for name, shape in shapes.items():
    rows = block_names(name, shape[0] if len(shape) else 0, sizes)
    if rows is None:
      out[name] = (name, None)
    else:
      out.update({row_name: (name, u) for u, row_name in enumerate(rows)})
  return out


def row_shape(shape, row) -> tuple:
  return tuple(shape) if row is None else tuple(shape)[1:]


def regex_rows(pattern: re.Pattern, name: str, shape, sizes: dict) -> np.ndarray | bool:
  """Whether `pattern` matches parameter `name`: a bool, or for a stacked
  parameter a bool per row (per block), matched against each block's name.
  `sizes`: unit_sizes of all the model's parameter names."""
  rows = block_names(name, shape[0], sizes) if is_stacked(name) else None
  if rows is None:
    return bool(pattern.search(name))
  return np.array([bool(pattern.search(r)) for r in rows])


def row_of(source: dict, where: tuple):
  """The array `where` = (stored name, row or None) points at in flat `source`."""
  name, row = where
  return source[name] if row is None else source[name][row]


def convert(source: dict, target_shapes: dict) -> dict:
  """Flat parameters {name: array} of either layout in the layout of
  `target_shapes` ({name: shape}): stacked rows are split into blocks, blocks
  stacked into rows. Every block of the target must be in the source."""
  where = per_block({n: np.shape(a) for n, a in source.items()})
  sizes = unit_sizes(target_shapes)
  out = {}
  for name, shape in target_shapes.items():
    rows = block_names(name, shape[0] if len(shape) else 0, sizes)
    out[name] = (row_of(source, where[name]) if rows is None
                 else jnp.stack([row_of(source, where[r]) for r in rows]))
  return out


def _scanned(names) -> bool | None:
  """True: stacked blocks; False: per-block; None: no blocks among `names`."""
  stacked = any("/scanned/" in n for n in names)
  return True if stacked else (False if any("/blocks/" in n for n in names) else None)


def layout_hint(saved: dict, wanted: dict) -> str:
  """One line when a checkpoint and a run differ in model.scan_layers, else ''."""
  have, want = _scanned(saved), _scanned(wanted)
  if have is None or want is None or have == want:
    return ""
  return (f"the checkpoint was written with model.scan_layers={have} and this run has "
          f"scan_layers={want}: resume with scan_layers={have}, or start a new run from "
          "this one with init_from (it converts between the layouts)")


def blocks_of(stack: dict) -> list:
  """A stack's nested parameter dict (either layout) as one dict per block, in order."""
  if stack.get("scanned") is None:
    blocks = stack["blocks"]
    return [blocks[k] for k in sorted(blocks, key=int)] if isinstance(blocks, dict) else blocks
  units = stack["scanned"]
  units = [units[j] for j in sorted(units, key=int)] if isinstance(units, dict) else units
  num_units = jnp.shape(next(_leaves(units[0])))[0]
  return [_index(units[j], u) for u in range(num_units) for j in range(len(units))]


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  elif tree is not None:
    yield tree


def _index(tree, u):
  return ({k: _index(v, u) for k, v in tree.items()} if isinstance(tree, dict)
          else None if tree is None else tree[u])
