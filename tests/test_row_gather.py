"""row_gather's moves and their written-out gradients, against plain indexing
differentiated by JAX, numpy, and the capacity MoE layer's einsum dispatch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import layers, moe as moe_lib
from bigjax.models import row_gather


def _rows(n, m=5, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, m)), jnp.float32)


def test_take_rows_gradient_equals_autodiffs_scatter_add():
  x = _rows(6)
  # Rows 0 and 3 read twice, row 5 never; output row 4 reads row 0 but is left
  # out of the readers, as a padding row is (its gradient is dropped).
  index = jnp.asarray([3, 0, 1, 3, 0, 2, 4, 0])
  readers = jnp.asarray([[1, 7], [2, 8], [5, 8], [0, 3], [6, 8], [8, 8]])
  upstream = _rows(8, seed=1).at[4].set(0.0)  # What a padding row's gradient is.
  np.testing.assert_array_equal(row_gather.take_rows(x, index, readers), np.asarray(x)[index])
  got = jax.grad(lambda x: jnp.sum(row_gather.take_rows(x, index, readers) * upstream))(x)
  want = jax.grad(lambda x: jnp.sum(x[index] * upstream))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (8, 8), (0, 0, 7)])
def test_expert_order_pads_each_experts_rows_to_whole_blocks(sizes, block):
  rng = np.random.default_rng(sum(sizes))
  experts = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))[:, None]  # k = 1
  eo = row_gather.expert_order(jnp.asarray(experts), len(sizes), block)
  starts, lengths = np.asarray(eo.starts), np.asarray(eo.lengths)
  want_lengths = [-(-s // block) * block for s in sizes]
  np.testing.assert_array_equal(lengths, want_lengths)
  np.testing.assert_array_equal(starts, np.cumsum(want_lengths) - want_lengths)
  x = _rows(len(experts))
  rows = np.asarray(row_gather.to_experts(x, eo))
  assert rows.shape[0] >= starts[-1] + lengths[-1]
  for e, (s, start) in enumerate(zip(sizes, starts)):  # Each expert's tokens, in order.
    np.testing.assert_array_equal(rows[start:start + s], np.asarray(x)[experts[:, 0] == e])
  # An FFN stand-in on the padded rows, and back: each token's value and gradient
  # are those of the same function on its own row.
  upstream = _rows(len(experts), seed=2)

  def through_rows(x):
    return row_gather.from_rows(jnp.tanh(row_gather.to_experts(x, eo)) * 3.0, eo)

  np.testing.assert_allclose(through_rows(x), jnp.tanh(x) * 3.0, rtol=1e-6)
  got = jax.grad(lambda x: jnp.sum(through_rows(x) * upstream))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.tanh(x) * 3.0 * upstream))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("block", [1, 4])
def test_expert_order_round_trip_is_the_gate_weighted_sum_numpy_gives(block):
  t, k, e = 7, 2, 3
  rng = np.random.default_rng(3)
  experts = np.stack([rng.permutation(e)[:k] for _ in range(t)])
  gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  x = _rows(t)
  scale = jnp.asarray([1.0, -2.0, 0.5])  # An "expert" that scales its rows.
  eo = row_gather.expert_order(jnp.asarray(experts), e, block)
  np.testing.assert_array_equal(eo.sizes, np.bincount(experts.ravel(), minlength=e))
  ends = np.cumsum(np.asarray(eo.lengths))
  rows = eo.token.shape[0]
  row_expert = np.minimum(np.searchsorted(ends, np.arange(rows), side="right"), e - 1)

  def layer(x, gates):
    ys = row_gather.to_experts(x, eo) * scale[jnp.asarray(row_expert)][:, None]
    return row_gather.from_experts(ys, gates, eo)

  want = sum(np.asarray(gates)[:, j, None] * np.asarray(scale)[experts[:, j], None] * np.asarray(x)
             for j in range(k))
  np.testing.assert_allclose(layer(x, gates), want, rtol=1e-6)
  upstream = _rows(t, seed=4)

  def reference(x, gates):  # The same sum by plain indexing, JAX's own gradients.
    return jnp.sum(gates[..., None] * scale[jnp.asarray(experts)][..., None] * x[:, None], axis=1)

  got = jax.grad(lambda x, g: jnp.sum(layer(x, g) * upstream), argnums=(0, 1))(x, gates)
  ref = jax.grad(lambda x, g: jnp.sum(reference(x, g) * upstream), argnums=(0, 1))(x, gates)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["sorted_blocks", "ragged_dot"])
def test_dropless_gradients_equal_the_einsum_capacity_layers(impl):
  """The dropless layer (moves by row_gather) and GShard top-2 with room for every
  token (moves by the dense dispatch einsums) compute the same function: their
  gradients for every parameter and the input agree."""
  cfg = layers.LayerConfig(emb_dim=16, num_heads=1, num_kv_heads=1, head_dim=16, mlp_dim=32,
                           mlp_activation="silu", gated_mlp=True, dtype=jnp.float32)
  capacity_cfg = moe_lib.MoEConfig(num_experts=4, router="gshard_top2", group_size=8,
                                   capacity_factor=2.0, eval_capacity_factor=2.0,
                                   random_routing=False, capacity_dispatch="einsum")
  capacity_layer = moe_lib.MoEFeedForward(cfg, capacity_cfg, rngs=nnx.Rngs(0))
  capacity_layer.router[...] = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)),
                                           jnp.float32)
  dropless_layer = moe_lib.MoEFeedForward(
      cfg, dataclasses.replace(capacity_cfg, router="dropless", top_k=2, dropless_impl=impl,
                               block_size=4), rngs=nnx.Rngs(1))
  nnx.update(dropless_layer, nnx.state(capacity_layer, nnx.Param))
  x = _rows(32, 16, seed=5).reshape(2, 16, 16)
  upstream = _rows(32, 16, seed=6).reshape(2, 16, 16)

  def grads(layer):
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params)(x, None) * upstream)

    return jax.grad(loss, argnums=(0, 1))(params, x)

  (got_params, got_x), (want_params, want_x) = grads(dropless_layer), grads(capacity_layer)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
