"""Moving token rows into expert order and back by gathers alone, both ways.

A dropless MoE layer copies each token's row to k places in expert order, pads
each expert's rows to whole blocks, and sums the k results back per token. Written
as gathers and scatter-adds, autodiff turns every gather into a scatter-add in the
backward pass, and XLA:CPU runs scatter-adds row by row: in peer.py's MoE layer
(4,096 token-choices of width 512) the moves took 29 ms of a ~230 ms layer. Each
move here is a gather whose gradient is a gather too, read through the inverse
map, which the sort has anyway: 11.5 ms (`take_rows`). A custom VJP has no
forward mode, so every dropless implementation is reverse-mode only (jax.jvp of
the layer fails; with `ragged_dot` it used to apply, `sorted_blocks` never did).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


@jax.custom_vjp
def take_rows(x, index, readers):
  """x[index] for x [N, ...], index [R] (each < N). readers [N, c]: the rows of the
  result that read each row of x, R where fewer than c do. The gradient of row i
  is the sum of the result's gradient over readers[i], a gather, not the
  scatter-add autodiff would write. Every row the result reads must appear
  among its readers, or its gradient is lost (a padding row may read any row
  and be left out)."""
  return x.at[index].get(mode="promise_in_bounds")


def _take_rows_forward(x, index, readers):
  return take_rows(x, index, readers), readers


def _take_rows_backward(readers, grad):
  # Reads past the end (the R of "no reader") give zeros.
  grad_x = grad.at[readers].get(mode="fill", fill_value=0).sum(axis=1)
  return grad_x, None, None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


class ExpertOrder(NamedTuple):
  """Token-choices [T, k] in expert order: choice j (flattened) is row
  position[j] of the sorted rows, which hold choices order[0], order[1], ..."""
  order: jax.Array  # [T*k] int32 choice of each sorted row
  position: jax.Array  # [T*k] int32 sorted row of each choice
  sizes: jax.Array  # [E] int32 rows of each expert
  k: int


def expert_order(experts, num_experts: int) -> ExpertOrder:
  """experts [T, k] int -> ExpertOrder (stable: a token's rows keep token order)."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return ExpertOrder(order, position, sizes, experts.shape[-1])


def to_experts(x, eo: ExpertOrder):
  """x [T, M] -> [T*k, M]: each token's row once per choice, in expert order."""
  return take_rows(x, eo.order // eo.k, eo.position.reshape(-1, eo.k))


def from_experts(ys, gates, eo: ExpertOrder):
  """ys [T*k, M] in expert order -> [T, M]: each token's k results weighted by
  its gates [T, k] and summed in float32 (then ys's dtype)."""
  per_choice = take_rows(ys, eo.position, eo.order[:, None])
  t, k = gates.shape
  weighted = per_choice.reshape(t, k, -1).astype(jnp.float32) * gates[..., None]
  return jnp.sum(weighted, axis=1).astype(ys.dtype)


class Blocks(NamedTuple):
  """Rows grouped in segments padded to whole blocks: segment g starts at
  starts[g] and holds lengths[g] rows (a multiple of the block), of which the
  first sizes[g] are real."""
  source: jax.Array  # [R] int32 unpadded row in each padded row (0 for padding)
  dest: jax.Array  # [N] int32 padded row of each unpadded row
  # The other direction's readers: [N, 1] the padded row that reads each real
  # unpadded row (R for the rest); [R, 1] the unpadded row that reads each real
  # padded row (N for padding).
  pad_readers: jax.Array
  unpad_readers: jax.Array
  starts: jax.Array  # [G] int32
  lengths: jax.Array  # [G] int32


def blocks(sizes, rows: int, block: int) -> Blocks:
  """The padded layout of `rows` rows grouped in segments of `sizes` [G] rows
  (contiguous, in order; rows past sum(sizes) are padding and left out), each
  padded to a multiple of `block`. R, a static bound: whole blocks of all rows
  plus one partial block per segment."""
  groups = sizes.shape[0]
  lengths = (sizes + block - 1) // block * block
  start = jnp.cumsum(sizes) - sizes
  starts = jnp.cumsum(lengths) - lengths
  padded_rows = (-(-rows // block) + groups) * block
  segment = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows), side="right")
  segment = jnp.minimum(segment, groups - 1)  # Rows past sum(sizes): never read.
  dest = (starts[segment] + jnp.arange(rows) - start[segment]).astype(jnp.int32)
  real = jnp.arange(rows) < jnp.sum(sizes)
  pad_readers = jnp.where(real, dest, padded_rows)
  unpad_readers = jnp.full((padded_rows,), rows, jnp.int32).at[pad_readers].set(
      jnp.arange(rows, dtype=jnp.int32), mode="drop")
  source = jnp.where(unpad_readers < rows, unpad_readers, 0)
  return Blocks(source, dest, pad_readers[:, None], unpad_readers[:, None],
                starts.astype(jnp.int32), lengths.astype(jnp.int32))


def padded(xs, b: Blocks):
  """xs [N, M] -> [R, M] in the padded layout (padding rows copy row 0, and
  their gradient is dropped)."""
  return take_rows(xs, b.source, b.pad_readers)


def unpadded(out, b: Blocks):
  """[R, M] in the padded layout -> [N, M]."""
  return take_rows(out, b.dest, b.unpad_readers)
