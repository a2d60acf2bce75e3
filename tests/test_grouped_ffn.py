"""grouped_ffn (the CPU path of dropless MoE) against the same FFN written with
XLA's jax.lax.ragged_dot: the output and the gradients of the rows and of every
weight, gated and plain, with segments of several chunk sizes, empty experts and
padded rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.models.grouped_ffn import grouped_ffn


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_ffn_and_its_gradients_equal_ragged_dot(gated):
  block, chunk_sizes = 4, (16, 4)
  lengths = np.array([20, 0, 4, 36, 8], np.int32)  # 16+4, none, 4, 16+16+4, 4+4.
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
  used = int(lengths.sum())
  rows = used + 3 * block  # Trailing rows outside every segment.
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  x, upstream = normal(rows, 6), normal(rows, 6)
  weights = {"wi": normal(5, 6, 7), "wo": normal(5, 7, 6)}
  if gated:
    weights["wi_gate"] = normal(5, 6, 7)
  sizes = jnp.asarray(lengths)

  def ours(x, weights):
    return grouped_ffn(x, weights, jax.nn.silu, jnp.asarray(starts), sizes, chunk_sizes)

  def theirs(x, weights):  # ragged_dot's groups cover the first `used` rows; then zeros.
    h = jax.lax.ragged_dot(x[:used], weights["wi"], sizes)
    gate = h if not gated else jax.lax.ragged_dot(x[:used], weights["wi_gate"], sizes)
    h = jax.nn.silu(gate) * (h if gated else 1.0)
    out = jax.lax.ragged_dot(h, weights["wo"], sizes)
    return jnp.concatenate([out, jnp.zeros((rows - used, 6), out.dtype)])

  got, want = jax.jit(ours)(x, weights), theirs(x, weights)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[used:]).max()) == 0.0
  # Chunks longer than all the rows are skipped; numpy inputs, outside jit, work.
  longer = grouped_ffn(np.asarray(x), jax.tree.map(np.asarray, weights), jax.nn.silu,
                       starts, lengths, (1024,) + chunk_sizes)
  np.testing.assert_allclose(longer, want, rtol=1e-5, atol=1e-5)

  def grads(f):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * upstream), argnums=(0, 1)))

  (gx, gw), (wx, ww) = grads(ours)(x, weights), grads(theirs)(x, weights)
  np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-4)
  assert sorted(gw) == sorted(weights)
  for name in weights:
    np.testing.assert_allclose(gw[name], ww[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert float(jnp.abs(gw[name][1]).max()) == 0.0 < float(jnp.abs(gw[name][3]).max())


def test_bfloat16_rows_with_float32_weights_compute_in_float32():
  lengths = np.array([8, 4], np.int32)
  starts = np.array([0, 8], np.int32)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(12, 6)), jnp.bfloat16)
  weights = {"wi": jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32),
             "wo": jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)}

  def loss(x, weights):
    out = grouped_ffn(x, weights, jax.nn.silu, starts, lengths, (4,))
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, out), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      x, weights)
  (_, want), (wx, ww) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x.astype(jnp.float32), weights)
  assert out.dtype == jnp.float32 and gx.dtype == jnp.bfloat16
  assert gw["wi"].dtype == gw["wo"].dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # The same float32 math.
  np.testing.assert_allclose(gx.astype(jnp.float32), wx, rtol=1e-2, atol=1e-2)
  for name in weights:
    np.testing.assert_allclose(gw[name], ww[name], rtol=1e-4, atol=1e-4, err_msg=name)
