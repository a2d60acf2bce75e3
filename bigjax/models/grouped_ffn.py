"""The experts' FFN over rows sorted by expert, for backends without a fast ragged_dot.

Expert e's rows are the segment rows[starts[e] : starts[e] + lengths[e]] and go
through expert e's FFN. XLA:CPU emulates jax.lax.ragged_dot with a dense product
per expert (E times the FLOPs), so here each segment is taken chunk by chunk in
loops with dynamic trip counts, expert by expert: the FLOPs follow the rows, and
each expert's weights are sliced once for its chunks rather than gathered into a
copy per block (whose gradient would be a scatter-add). Chunks are as long as the
segment allows (`chunk_sizes`, largest first) because short matmuls run slower.
All three products of a chunk (gate, input, output) run in one loop body, and the
backward pass (a custom VJP) walks the same chunks once: a loop per product made
the MoE layer ~10% slower on CPU (the chunk's rows copied three times, three times
the loop's overhead).
Weight gradients are accumulated in float32.
"""
import functools

import jax
import jax.numpy as jnp


def _for_each_chunk(fn, carry, weights, starts, lengths, chunk_sizes):
  """carry = fn(carry, expert_weights, e, first_row, size) over every chunk of every
  segment e, expert by expert: as many chunks of chunk_sizes[0] rows as fit, then
  of the next size, and so on. Each expert's weights are sliced once for all its
  chunks (a copy per chunk made the forward pass ~10% slower on CPU). Segment
  lengths must be multiples of the last size."""

  def expert(e, carry):
    expert_weights = tuple(None if w is None else w[e] for w in weights)
    row, length = starts[e], lengths[e]
    for size in chunk_sizes:
      count = length // size
      carry = jax.lax.fori_loop(
          0, count, lambda j, carry, row=row, size=size: fn(carry, expert_weights, e,
                                                             row + j * size, size), carry)
      row, length = row + count * size, length - count * size
    return carry

  return jax.lax.fori_loop(0, starts.shape[0], expert, carry)


def grouped_ffn(rows, weights: dict, activation, starts, lengths, chunk_sizes):
  """rows [R, M] -> [R, M']: each expert's segment of rows x through its FFN,
  activation(x @ wi_gate[e]) * (x @ wi[e]) @ wo[e], or activation(x @ wi[e]) @ wo[e]
  without "wi_gate" in `weights` ({name: [E, ...]}). Rows outside every segment
  give zeros. `starts`, `lengths` [E] int32 (lengths multiples of chunk_sizes[-1],
  segments within the R rows)."""
  names = ("wi", "wo") + (("wi_gate",) if "wi_gate" in weights else ())
  # Inside a shard_map, rows and weights may vary over different mesh axes, and a
  # loop's carry must keep one type: all are cast to vary over all of them here,
  # where autodiff transposes the casts (summing the weights' gradients).
  # (As arrays: a numpy weight could not be indexed by the loop's expert index.)
  args = tuple(map(jnp.asarray, (rows, starts, lengths, *(weights[n] for n in names))))
  varying = frozenset.union(*(jax.typeof(a).mat.varying for a in args))
  rows, starts, lengths, *expert_weights = (
      a if jax.typeof(a).mat.varying == varying
      else jax.lax.pcast(a, tuple(varying - jax.typeof(a).mat.varying), to="varying")
      for a in args)
  # A chunk longer than all the rows is never needed (nor can it be sliced).
  *longer, last = chunk_sizes
  chunk_sizes = tuple(c for c in longer if c <= rows.shape[0]) + (last,)
  return _grouped_ffn(rows, tuple(expert_weights), starts, lengths, activation, chunk_sizes)


def _unpack(weights):
  """(wi, wo, wi_gate), wi_gate None for an FFN without a gate."""
  return weights + (None,) * (3 - len(weights))


def _hidden(activation, pre, pre_gate):
  return activation(pre) if pre_gate is None else activation(pre_gate) * pre


def _ffn_with_residuals(rows, weights, starts, lengths, activation, chunk_sizes):
  """The output, and the pre-activations x @ wi and x @ wi_gate (or None) the
  backward pass needs."""
  wi, wo, wi_gate = _unpack(weights)

  def chunk(carry, expert_weights, e, row, size):
    out, pre, pre_gate = carry
    wi_e, wo_e, wi_gate_e = expert_weights
    x = jax.lax.dynamic_slice_in_dim(rows, row, size)
    p = x @ wi_e
    pg = None if wi_gate_e is None else x @ wi_gate_e
    out = jax.lax.dynamic_update_slice_in_dim(out, _hidden(activation, p, pg) @ wo_e, row, 0)
    pre = jax.lax.dynamic_update_slice_in_dim(pre, p, row, 0)
    if pg is not None:
      pre_gate = jax.lax.dynamic_update_slice_in_dim(pre_gate, pg, row, 0)
    return out, pre, pre_gate

  # Each buffer in its product's dtype (bfloat16 rows times float32 weights: float32).
  hidden_dtype = jnp.result_type(rows, wi)
  hidden = jnp.zeros_like(rows, hidden_dtype, shape=(rows.shape[0], wi.shape[-1]))
  out = jnp.zeros_like(rows, jnp.result_type(hidden_dtype, wo),
                       shape=(rows.shape[0], wo.shape[-1]))
  return _for_each_chunk(chunk, (out, hidden, None if wi_gate is None else hidden),
                         _unpack(weights), starts, lengths, chunk_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_ffn(rows, weights, starts, lengths, activation, chunk_sizes):
  return _ffn_with_residuals(rows, weights, starts, lengths, activation, chunk_sizes)[0]


def _forward(rows, weights, starts, lengths, activation, chunk_sizes):
  out, pre, pre_gate = _ffn_with_residuals(rows, weights, starts, lengths, activation,
                                           chunk_sizes)
  return out, (rows, weights, starts, lengths, pre, pre_gate)


def _backward(activation, chunk_sizes, residuals, grad_out):
  rows, weights, starts, lengths, pre, pre_gate = residuals
  outer = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

  def chunk(carry, expert_weights, e, row, size):
    grad_rows, grad_weights = carry
    wi_e, wo_e, wi_gate_e = expert_weights
    x, g, p = (jax.lax.dynamic_slice_in_dim(a, row, size) for a in (rows, grad_out, pre))
    pg = None if wi_gate_e is None else jax.lax.dynamic_slice_in_dim(pre_gate, row, size)
    h, hidden_vjp = jax.vjp(functools.partial(_hidden, activation), p, pg)
    grad_p, grad_pg = hidden_vjp(g @ wo_e.T)
    grad_x = grad_p @ wi_e.T
    # The weight gradients contract the chunk's rows. Over [features, rows] copies
    # of x and h (held by barriers, or XLA folds the transposes back into the
    # products) XLA:CPU runs them at 270-390 GFLOP/s instead of 190-350 (chunks of
    # 128 and 512 rows); the MoE layer of peer.py 1.075x faster (in-process A/B).
    x_t = jax.lax.optimization_barrier(x.T)
    new = [outer(x_t, grad_p), outer(jax.lax.optimization_barrier(h.T), g)]
    if wi_gate_e is not None:
      grad_x = grad_x + grad_pg @ wi_gate_e.T
      new.append(outer(x_t, grad_pg))
    grad_weights = tuple(acc.at[e].add(n) for acc, n in zip(grad_weights, new))
    grad_x = grad_x.astype(rows.dtype)
    return jax.lax.dynamic_update_slice_in_dim(grad_rows, grad_x, row, 0), grad_weights

  init = (jnp.zeros_like(rows), tuple(jnp.zeros_like(w, jnp.float32) for w in weights))
  grad_rows, grad_weights = _for_each_chunk(chunk, init, _unpack(weights), starts, lengths,
                                            chunk_sizes)
  return (grad_rows, tuple(g.astype(w.dtype) for g, w in zip(grad_weights, weights)),
          None, None)


_grouped_ffn.defvjp(_forward, _backward)
