"""Softmax attention's core (scores, softmax, values) with a hand-written backward pass.

The queries are scored in row blocks, each against the keys up to its own last row
only (a causal self-attention's later keys are masked for every row of the block, so
their scores need not be computed: 4 blocks skip 3/8 of the work).

Why not autodiff: its backward pass of these products multiplies by the transposed
[t, s] weight and score-gradient matrices, which XLA:CPU writes out as transposed
copies (~30 ms of every GPT-2 speed step in peer.py), passes the gradients of the
block slices through pads, and selects the masked gradients out again. Here the
masked entries' weights are already zero, and the two products that contract over
the query rows (the keys' and values' gradients) take the small [t, d] operands
as [d, t] copies made once per call: given a row-contracted operand, XLA:CPU's
batched products at this size run at ~1/3 of their row-major speed (100-120
against ~320 GFLOP/s for [64, 256, 64] x [64, 256, 256]). An optimisation barrier
holds each copy, as XLA would otherwise fold the transpose back into the product.
In-process A/B of the GPT-2 step of `experiments/benchmarks/peer.py --part=speed`
(alternated rounds): the hand-written backward 1.048x faster than autodiff's, the
[d, t] copies 1.023x on top (16 rounds in a shuffled order).
tests/test_attention_core.py holds the outputs and gradients to autodiff of the
textbook softmax attention, and with dropout to finite differences.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

# The products that contract over the query rows: (g, t) of [b, kv, x, g, t] with
# (g, t) of [b, kv, g, t, y] -> [b, kv, x, y], a row-major batched matmul.
_ROW_CONTRACTION = (((3, 4), (2, 3)), ((0, 1), (0, 1)))


def attention(q, k, v, mask, *, blocks: int, dropout_rate: float = 0.0, rng=None,
              bias=None):
  """softmax(q k^T + bias, masked) v over heads-major arrays, without the 1/sqrt(d) scale.

  q [b, kv, g, t, d] (g query heads share each key/value head), k, v [b, kv, s, d],
  mask [b, 1, t, s] (True: attend). bias: None, or (table [n, kv, g], ids [b or 1,
  t, s]) for scores + table[ids] (T5's relative position biases: a learned value
  per bucket and head), added in float32; the table is differentiated. Its
  gradient is reduced into the [n, kv, g] table inside each call, never as a [t, s]
  bias summed over the batch: under data parallelism that would be an all-reduce
  of [heads, t, s] per layer and step (measured on 8 CPU devices), not of the table.
  `blocks` row blocks of t // blocks rows, each over the keys up to its last row
  (blocks > 1 only for a causal mask with t == s); 1 scores every row against
  every key. Dropout of the attention weights when `rng` is given and the rate is
  positive. The products take q's dtype and give float32 (or q's dtype if wider),
  in which the softmax runs: bf16 scores would be rounded before the exponential.
  The weights enter the value products in q's dtype, as in fused kernels. Returns
  [b, kv, g, t, d] in q's dtype.
  """
  if rng is None or dropout_rate == 0.0:
    rng, dropout_rate = None, 0.0
  t, s = q.shape[-2], k.shape[-2]
  if blocks > 1 and (t % blocks or t != s):  # Rows past the last whole block would go.
    raise ValueError(f"attention in {blocks} row blocks needs a causal self-attention whose "
                     f"length divides by them; got {t} queries over {s} keys.")
  table, ids = (None, None) if bias is None else bias
  return _attention(q, k, v, mask, table, ids, rng, blocks, dropout_rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, mask, table, ids, rng, blocks, rate):
  return _forward(q, k, v, mask, table, ids, rng, blocks, rate)[0]


def _block_spans(t: int, s: int, blocks: int):
  """(query rows, keys seen) of each row block."""
  rows = t // blocks
  return [(slice(i * rows, (i + 1) * rows), (i + 1) * rows if blocks > 1 else s)
          for i in range(blocks)]


def _keep_masks(rng, batch_dims, spans, rate):
  """Each block's dropout keep mask [*batch_dims, rows, keys] (None without dropout).
  Kept as residuals: the backward pass drops the same weights."""
  if rng is None:
    return [None] * len(spans)
  keys = jax.random.split(rng, len(spans))
  return [jax.random.bernoulli(key, 1.0 - rate, (*batch_dims, rows.stop - rows.start, end))
          for key, (rows, end) in zip(keys, spans)]


def _dropped(w, keep, rate):
  return w if keep is None else jnp.where(keep, w / (1.0 - rate), 0.0).astype(w.dtype)


def _block_bias(table, ids, rows, end, dtype):
  """table[ids] for one row block: [b or 1, kv, g, rows, end] in `dtype`."""
  return table.astype(dtype)[ids[:, rows, :end]].transpose(0, 3, 4, 1, 2)


def _forward(q, k, v, mask, table, ids, rng, blocks, rate):
  dt, acc = q.dtype, jnp.promote_types(q.dtype, jnp.float32)
  spans = _block_spans(q.shape[3], k.shape[2], blocks)
  keeps = _keep_masks(rng, q.shape[:3], spans, rate)
  outs, weights, totals = [], [], []
  for (rows, end), keep in zip(spans, keeps):
    scores = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, rows], k[:, :, :end],
                        preferred_element_type=acc)
    if table is not None:
      scores = scores + _block_bias(table, ids, rows, end, acc)
    scores = jnp.where(mask[:, :, None, rows, :end], scores, jnp.finfo(acc).min)
    # Unnormalised weights, normalised after the value product (a division over
    # [.., t, d] rather than [.., t, s]); the maximum is a constant shift.
    w = jnp.exp(scores - scores.max(-1, keepdims=True))
    total = w.sum(-1, keepdims=True)
    w = w.astype(dt)
    outs.append((jnp.einsum("bkgts,bksd->bkgtd", _dropped(w, keep, rate), v[:, :, :end],
                            preferred_element_type=acc) / total).astype(dt))
    weights.append(w)
    totals.append(total)
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, mask, table, ids, keeps, out, weights, totals)


def _backward(blocks, rate, residuals, d_out):
  q, k, v, mask, table, ids, keeps, out, weights, totals = residuals
  dt, acc = q.dtype, jnp.promote_types(q.dtype, jnp.float32)
  spans = _block_spans(q.shape[3], k.shape[2], blocks)
  # With P = softmax(scores) = w / total and P' = P dropped out, out = P' v, so
  # d_scores = P * (d_P - rowsum(d_out * out)), d_P = d_out v^T [* keep / (1 - rate)]
  # (rowsum(P * d_P) = rowsum(d_out * out)). The 1/total is taken into d_out's rows.
  d_o = d_out.astype(acc) / jnp.concatenate(totals, axis=3)
  row_dots = jnp.sum(d_o * out.astype(acc), -1, keepdims=True)
  d_o = d_o.astype(dt)
  # [b, kv, d, g, t] copies for the row-contracted products (module docstring),
  # which give q's dtype: XLA:CPU has no bf16 x bf16 = f32 kernel for their form.
  q_t, d_o_t = (lax.optimization_barrier(x.transpose(0, 1, 4, 2, 3)) for x in (q, d_o))
  b, kv, s, d = k.shape
  dq, dk_t, dv_t = [], jnp.zeros((b, kv, d, s), acc), jnp.zeros((b, kv, d, s), acc)
  d_table = None if table is None else jnp.zeros(table.shape, acc)
  for (rows, end), keep, w in zip(spans, keeps, weights):
    d_p = jnp.einsum("bkgtd,bksd->bkgts", d_o[:, :, :, rows], v[:, :, :end],
                     preferred_element_type=acc)
    if keep is not None:
      d_p = jnp.where(keep, d_p / (1.0 - rate), 0.0)
    # Masked entries' weights are exact zeros, except in rows with no key at all
    # (uniform weights): the select keeps their scores' gradients zero, as masking is.
    d_scores = jnp.where(mask[:, :, None, rows, :end],
                         w.astype(acc) * (d_p - row_dots[:, :, :, rows]), 0.0)
    if table is not None:  # Each score's gradient goes to its bucket's table entry.
      # Per row, then over the rows: summed over the batch first, the [kv, g, t, s]
      # scores' gradient would be all-reduced under data parallelism, not the table's.
      buckets = jax.nn.one_hot(ids[:, rows, :end], table.shape[0], dtype=acc)
      spec = "bkgts,tsn->bnkg" if ids.shape[0] == 1 else "bkgts,btsn->bnkg"
      d_table += jnp.einsum(spec, d_scores, buckets[0] if ids.shape[0] == 1 else buckets).sum(0)
    d_scores = d_scores.astype(dt)
    dq.append(jnp.einsum("bkgts,bksd->bkgtd", d_scores, k[:, :, :end],
                         preferred_element_type=acc).astype(dt))
    dk_t = dk_t.at[..., :end].add(
        lax.dot_general(q_t[..., rows], d_scores, _ROW_CONTRACTION).astype(acc))
    dv_t = dv_t.at[..., :end].add(
        lax.dot_general(d_o_t[..., rows], _dropped(w, keep, rate), _ROW_CONTRACTION)
        .astype(acc))
  dk, dv = (x.swapaxes(2, 3) for x in (dk_t, dv_t))
  return (jnp.concatenate(dq, axis=3).astype(dt), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None if table is None else d_table.astype(table.dtype), None, None)


_attention.defvjp(_forward, _backward)
