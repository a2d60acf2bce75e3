"""grouped_matmul (the CPU path of dropless MoE) against XLA's jax.lax.ragged_dot:
the product and both gradients, with segments of several chunk sizes, empty
experts and padded rows."""
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.models.grouped_matmul import grouped_matmul


def test_grouped_matmul_and_its_gradients_equal_ragged_dot():
  block, chunk_sizes = 4, (16, 4)
  lengths = np.array([20, 0, 4, 36, 8], np.int32)  # 16+4, none, 4, 16+16+4, 4+4.
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
  rows = int(lengths.sum()) + 3 * block  # Trailing rows outside every segment.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(len(lengths), 6, 5)), jnp.float32)
  upstream = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
  # ragged_dot's groups cover the first sum(lengths) rows; the rest must be zeros.
  sizes = jnp.asarray(lengths)

  def ours(x, w):
    return grouped_matmul(x, w, jnp.asarray(starts), sizes, chunk_sizes)

  def theirs(x, w):
    used = jax.lax.ragged_dot(x[:int(lengths.sum())], w, sizes)
    return jnp.concatenate([used, jnp.zeros((rows - used.shape[0], 5), used.dtype)])

  got, want = jax.jit(ours)(x, w), theirs(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[int(lengths.sum()):]).max()) == 0.0
  # Chunks longer than all the rows are skipped; numpy inputs, outside jit, work.
  longer = grouped_matmul(np.asarray(x), np.asarray(w), starts, lengths,
                          (1024,) + chunk_sizes)
  np.testing.assert_allclose(longer, want, rtol=1e-5, atol=1e-5)

  def loss(f):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * upstream), argnums=(0, 1)))

  (gx, gw), (wx, ww) = loss(ours)(x, w), loss(theirs)(x, w)
  np.testing.assert_allclose(gx, wx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(gw[1]).max()) == 0.0 < float(jnp.abs(gw[3]).max())  # Empty expert.
