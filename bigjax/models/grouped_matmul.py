"""Grouped matmul over rows sorted by expert, for backends without a fast ragged_dot.

Expert e's rows are the segment rows[starts[e] : starts[e] + lengths[e]] and are
multiplied by weights[e]. XLA:CPU emulates jax.lax.ragged_dot with a dense product
per expert (E times the FLOPs), so here each segment is multiplied chunk by chunk
in a loop with a dynamic trip count: the FLOPs follow the rows, and the weights
are read per chunk rather than gathered into a copy per block (whose gradient
would be a scatter-add). Chunks are as long as the segment allows
(`chunk_sizes`, largest first) because short matmuls run slower; the backward
pass (a custom VJP) walks the same chunks, accumulating each expert's weight
gradient in float32.
"""
import functools

import jax
import jax.numpy as jnp


def _for_each_chunk(fn, carry, starts, lengths, chunk_sizes):
  """carry = fn(carry, expert, first_row, size) over every chunk of every segment:
  as many chunks of chunk_sizes[0] rows as fit, then of the next size, and so on.
  Segment lengths must be multiples of the last size."""
  for size in chunk_sizes:
    counts = lengths // size
    ends = jnp.cumsum(counts)  # Chunk j of this size belongs to the first e with j < ends[e].

    def body(j, carry, size=size, counts=counts, ends=ends, starts=starts):
      e = jnp.searchsorted(ends, j, side="right")
      return fn(carry, e, starts[e] + (j - (ends[e] - counts[e])) * size, size)

    carry = jax.lax.fori_loop(0, ends[-1], body, carry)
    starts, lengths = starts + counts * size, lengths - counts * size
  return carry


def grouped_matmul(rows, weights, starts, lengths, chunk_sizes):
  """rows [R, K], weights [E, K, N] -> [R, N]: each expert's segment of rows times
  its weights; rows outside every segment give zeros. `starts`, `lengths` [E] int32
  (lengths multiples of chunk_sizes[-1], segments within the R rows)."""
  # Inside a shard_map, rows and weights may vary over different mesh axes, and a
  # loop's carry must keep one type: both are cast to vary over all of them here,
  # where autodiff transposes the casts (summing the weights' gradient).
  # (As arrays: a numpy weight could not be indexed by the loop's expert index.)
  args = tuple(map(jnp.asarray, (rows, weights, starts, lengths)))
  varying = frozenset.union(*(jax.typeof(a).mat.varying for a in args))
  rows, weights, starts, lengths = (
      a if jax.typeof(a).mat.varying == varying
      else jax.lax.pcast(a, tuple(varying - jax.typeof(a).mat.varying), to="varying")
      for a in args)
  # A chunk longer than all the rows is never needed (nor can it be sliced).
  chunk_sizes = tuple(c for c in chunk_sizes[:-1] if c <= rows.shape[0]) + chunk_sizes[-1:]
  return _grouped_matmul(rows, weights, starts, lengths, chunk_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_matmul(rows, weights, starts, lengths, chunk_sizes):
  def chunk(out, e, row, size):
    x = jax.lax.dynamic_slice_in_dim(rows, row, size)
    return jax.lax.dynamic_update_slice_in_dim(out, x @ weights[e], row, 0)
  out = jnp.zeros_like(rows, shape=(rows.shape[0], weights.shape[-1]))
  return _for_each_chunk(chunk, out, starts, lengths, chunk_sizes)


def _forward(rows, weights, starts, lengths, chunk_sizes):
  return (_grouped_matmul(rows, weights, starts, lengths, chunk_sizes),
          (rows, weights, starts, lengths))


def _backward(chunk_sizes, residuals, grad_out):
  rows, weights, starts, lengths = residuals

  def chunk(carry, e, row, size):
    grad_rows, grad_weights = carry
    x = jax.lax.dynamic_slice_in_dim(rows, row, size)
    g = jax.lax.dynamic_slice_in_dim(grad_out, row, size)
    grad_rows = jax.lax.dynamic_update_slice_in_dim(grad_rows, g @ weights[e].T, row, 0)
    grad_weights = grad_weights.at[e].add(
        jnp.matmul(x.T, g, preferred_element_type=jnp.float32))
    return grad_rows, grad_weights

  grad_rows, grad_weights = _for_each_chunk(
      chunk, (jnp.zeros_like(rows), jnp.zeros_like(weights, jnp.float32)), starts,
      lengths, chunk_sizes)
  return grad_rows, grad_weights.astype(weights.dtype), None, None


_grouped_matmul.defvjp(_forward, _backward)
