"""Moving token rows into expert order and back by gathers alone, both ways.

A dropless MoE layer copies each token's row to k places in expert order, each
expert's rows padded to whole blocks, and sums the k results back per token. Written
as gathers and scatter-adds, autodiff turns every gather into a scatter-add in the
backward pass, and XLA:CPU runs scatter-adds row by row: in peer.py's MoE layer
(4,096 token-choices of width 512) the moves took 29 ms of a ~230 ms layer. Each
move here is a gather whose gradient is a gather too, read through the inverse
map, which the sort has anyway: 11.5 ms (`take_rows`). Sorting and padding to
blocks are one layout (`expert_order`), so one gather each way. A custom VJP has no
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
  """Token-choices [T, k] laid out by expert: expert e's rows, its choices in
  token order, are the segment starting at row starts[e], padded to
  lengths[e] rows (whole blocks), of which the first sizes[e] are real. Rows
  past the segments and the padding in them read token 0 and are never read."""
  token: jax.Array  # [R] int32 the token each row reads (0 for padding)
  choice: jax.Array  # [R] int32 the choice (flattened [T*k]) each row holds; T*k for padding
  position: jax.Array  # [T*k] int32 the row of each choice
  sizes: jax.Array  # [E] int32 real rows of each expert
  starts: jax.Array  # [E] int32
  lengths: jax.Array  # [E] int32, multiples of the block
  k: int


def expert_order(experts, num_experts: int, block: int = 1) -> ExpertOrder:
  """experts [T, k] int -> ExpertOrder with segments padded to multiples of
  `block` (stable: a token's rows keep token order). R, a static bound: T*k for
  block 1; else whole blocks of all choices plus one partial block per expert."""
  flat = experts.reshape(-1)
  n = flat.shape[0]
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # The choice of each sorted row.
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  lengths = (sizes + block - 1) // block * block
  starts = jnp.cumsum(lengths) - lengths
  rows = n if block == 1 else (-(-n // block) + num_experts) * block
  expert = flat[order]
  row = (starts[expert] + jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[expert]).astype(jnp.int32)
  position = jnp.zeros_like(order).at[order].set(row)
  choice = jnp.full((rows,), n, jnp.int32).at[row].set(order)
  token = jnp.where(choice < n, choice // experts.shape[-1], 0)
  return ExpertOrder(token, choice, position, sizes, starts.astype(jnp.int32),
                     lengths.astype(jnp.int32), experts.shape[-1])


def to_experts(x, eo: ExpertOrder):
  """x [T, M] -> [R, M]: each token's row once per choice, in expert order."""
  return take_rows(x, eo.token, eo.position.reshape(-1, eo.k))


def from_rows(ys, eo: ExpertOrder):
  """ys [R, M] in expert order -> [T*k, M]: each choice's row."""
  return take_rows(ys, eo.position, eo.choice[:, None])


def from_experts(ys, gates, eo: ExpertOrder):
  """ys [R, M] in expert order -> [T, M]: each token's k results weighted by
  its gates [T, k] and summed in float32 (then ys's dtype)."""
  t, k = gates.shape
  weighted = from_rows(ys, eo).reshape(t, k, -1).astype(jnp.float32) * gates[..., None]
  return jnp.sum(weighted, axis=1).astype(ys.dtype)
