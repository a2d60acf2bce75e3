"""layers.dense's written-out backward pass against autodiff of the plain einsum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.models import layers


@pytest.mark.parametrize("x_shape,kernel_shape,contract", [
    ((2, 5, 24), (24, 6), 1),      # Wide input, narrow output: the (g^T x)^T form.
    ((2, 5, 6), (6, 24), 1),       # Narrow input, wide output: x^T g.
    ((3, 7, 4, 5), (4, 5, 8), 2),  # Heads and head_dim contracted at once (20 > 8).
    ((4, 8), (8, 8, 3), 1),        # Square, a rank-3 kernel.
])
def test_dense_gradients_match_autodiff_of_einsum(x_shape, kernel_shape, contract):
  def plain(x, kernel):
    return jnp.tensordot(x, kernel, axes=contract)
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x, kernel = (jnp.asarray(rng.normal(size=s)) for s in (x_shape, kernel_shape))
    got_y, got_vjp = jax.vjp(lambda x, k: layers.dense(x, k, contract), x, kernel)
    want_y, want_vjp = jax.vjp(plain, x, kernel)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-12)
    d_y = jnp.asarray(rng.normal(size=want_y.shape))
    for got, want in zip(got_vjp(d_y), want_vjp(d_y), strict=True):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_dense_gradients_keep_each_operands_dtype():
  """A bfloat16 kernel under float32 activations: each gradient in its operand's
  dtype, and equal to the float32 computation up to bfloat16 rounding."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(32, 8)), jnp.bfloat16)
  d_y = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  dx, dk = jax.vjp(layers.dense, x, kernel)[1](d_y)
  assert (dx.dtype, dk.dtype) == (jnp.float32, jnp.bfloat16)
  want_dx, want_dk = jax.vjp(jnp.dot, x, kernel.astype(jnp.float32))[1](d_y)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk.astype(jnp.float32), want_dk, rtol=1e-2, atol=1e-2)
