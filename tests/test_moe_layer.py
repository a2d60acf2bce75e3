"""Tests of one MoEFeedForward layer (bigjax.models.moe), called directly (eval
mode is rng=None): identical experts equal the dense MLP, the dropless router equals
the capacity routers when they drop nothing, and the switch, GShard (with drops) and
expert-choice outputs equal a per-token loop over the routing written out in float64
numpy; also capacity and tied routing, dropped tokens through the residual, float32
router logits under bfloat16, jitter, the dropless implementation picked on CPU and
gradients. The expert-parallel train step on 8 devices:
tests/test_moe_sharded_step.py."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import attention, layers, moe as moe_lib, routing, stack, transformer


EMB, MLP_DIM, E = 16, 32, 4
BATCH, LENGTH, GROUP = 2, 16, 8  # -> 4 groups of 8 tokens


def _layer_cfg(dtype=jnp.float32, gated=False, activation="gelu"):
  return layers.LayerConfig(emb_dim=EMB, num_heads=1, num_kv_heads=1, head_dim=EMB,
                            mlp_dim=MLP_DIM, mlp_activation=activation, gated_mlp=gated,
                            dtype=dtype)


def _moe(router="gshard_top2", seed=0, router_scale=1.0, cfg=None, **kw):
  """A layer whose router is scaled up, so that tokens spread over the experts."""
  moe_cfg = moe_lib.MoEConfig(num_experts=E, router=router, group_size=GROUP,
                              random_routing=False, **kw)
  layer = moe_lib.MoEFeedForward(cfg or _layer_cfg(), moe_cfg, rngs=nnx.Rngs(seed))
  router_w = np.random.default_rng(seed).normal(size=(EMB, E)) * router_scale
  layer.router[...] = jnp.asarray(router_w, layer.router[...].dtype)
  return layer


def _with_moe(layer, **changes):
  """A copy of `layer` (same parameters) with other MoEConfig fields."""
  other = moe_lib.MoEFeedForward(layer.cfg, dataclasses.replace(layer.moe, **changes),
                                 rngs=nnx.Rngs(99))
  nnx.update(other, nnx.state(layer, nnx.Param))
  return other


def _x(seed=0, shape=(BATCH, LENGTH, EMB), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@functools.partial(jax.jit, static_argnums=0)
def _apply_pure(graphdef, state, x, rng):
  layer = nnx.merge(graphdef, state)
  y, sown = nnx.capture(layer, nnx.Intermediate)(x, rng)
  return y, sown["router_metrics"].get_value()[-1]


def apply(layer, x, rng=None):
  """(output, router metrics) of one jitted call; the layer itself is untouched."""
  graphdef, state = nnx.split(layer)
  return _apply_pure(graphdef, state, x, rng)


def _np_act(name, h):
  if name == "gelu":  # jax.nn.gelu's default tanh approximation
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
  assert name == "silu"
  return h / (1 + np.exp(-h))


def _np_expert(layer, e, x):
  """FFN of expert e on tokens x [..., M], in float64 numpy."""
  wi = np.asarray(layer.wi[...], np.float64)[e]
  wo = np.asarray(layer.wo[...], np.float64)[e]
  h = np.asarray(x, np.float64) @ wi
  return _np_act(layer.cfg.mlp_activation, h) @ wo


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("gated,activation", [(False, "gelu"), (True, "silu")])
def test_identical_experts_equal_the_dense_mlp(gated, activation):
  cfg = _layer_cfg(gated=gated, activation=activation)
  mlp = layers.MLP(cfg, rngs=nnx.Rngs(1))
  layer = _moe(cfg=cfg, capacity_factor=2.0, eval_capacity_factor=2.0)  # C = S
  for name in ("wi", "wo") + (("wi_gate",) if gated else ()):
    w = getattr(mlp, name)[...]
    getattr(layer, name)[...] = jnp.broadcast_to(w, (E,) + w.shape)
  x = _x()
  want = mlp(x)
  for rng in (None, jax.random.PRNGKey(0)):  # eval and train mode (no random routing)
    y, metrics = apply(layer, x, rng)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["dropped"]) == 0.0
  # The routing really is spread over the experts (not a degenerate test).
  assert int(jnp.sum(metrics["load"] > 0)) == E


@pytest.mark.parametrize("impl,gated", [("ragged_dot", False), ("sorted_blocks", False),
                                         ("ragged_dot", True), ("sorted_blocks", True)])
def test_dropless_top2_equals_gshard_without_drops(impl, gated):
  cfg = _layer_cfg(gated=gated, activation="silu" if gated else "gelu")
  top2 = _moe(cfg=cfg, capacity_factor=2.0, eval_capacity_factor=2.0)  # C = S: no drops
  drop = _with_moe(top2, router="dropless", top_k=2, dropless_impl=impl, block_size=4)
  x = _x(1)
  want, m_want = apply(top2, x, None)
  for rng in (None, jax.random.PRNGKey(1)):
    y, m = apply(drop, x, rng)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["z_loss"], m_want["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["load"], m_want["load"], rtol=1e-6)
    assert float(m["dropped"]) == 0.0 == float(m_want["dropped"])
  # Train mode of the capacity router (random routing off) agrees too.
  np.testing.assert_allclose(apply(top2, x, jax.random.PRNGKey(2))[0], want, rtol=1e-6)


@pytest.mark.parametrize("impl", ["ragged_dot", "sorted_blocks"])
def test_dropless_top1_equals_switch_without_drops(impl):
  switch = _moe("switch_top1", seed=2, capacity_factor=4.0, eval_capacity_factor=4.0)
  drop = _with_moe(switch, router="dropless", top_k=1, dropless_impl=impl, block_size=4)
  x = _x(2)
  want, m_want = apply(switch, x, None)
  assert float(m_want["dropped"]) == 0.0
  y, m = apply(drop, x, None)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["load"], m_want["load"], rtol=1e-6)


def test_switch_output_is_pmax_times_argmax_expert():
  layer = _moe("switch_top1", seed=3, capacity_factor=4.0, eval_capacity_factor=4.0)
  x = _x(3)
  y, _ = apply(layer, x, None)
  xn = np.asarray(x, np.float64).reshape(-1, EMB)
  probs = _np_softmax(xn @ np.asarray(layer.router[...], np.float64))
  want = np.zeros_like(xn)
  for t in range(xn.shape[0]):
    e = int(np.argmax(probs[t]))
    want[t] = probs[t, e] * _np_expert(layer, e, xn[t])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, EMB), want, rtol=1e-4, atol=1e-6)


def test_gshard_output_by_hand_with_drops():
  """C small enough to drop: each token's output is the sum over its *kept* choices
  of (renormalised gate) x expert FFN, computed by a per-token loop."""
  layer = _moe(seed=4, capacity_factor=0.5, eval_capacity_factor=0.5)
  cap = routing.capacity(GROUP, E, 2, 0.5)
  x = _x(4)
  y, m = apply(layer, x, None)
  xg = np.asarray(x, np.float64).reshape(-1, GROUP, EMB)
  probs = _np_softmax(xg @ np.asarray(layer.router[...], np.float64))
  want = np.zeros_like(xg)
  kept = 0
  for g in range(xg.shape[0]):
    count = [0] * E
    order = [np.argsort(-probs[g, s], kind="stable")[:2] for s in range(GROUP)]
    for choice in (0, 1):  # all first choices, then all second choices
      for s in range(GROUP):
        e = int(order[s][choice])
        gate = probs[g, s, e] / probs[g, s, order[s]].sum()
        if count[e] < cap:
          want[g, s] += gate * _np_expert(layer, e, xg[g, s])
          kept += 1
        count[e] += 1
  np.testing.assert_allclose(np.asarray(y).reshape(xg.shape), want, rtol=1e-4, atol=1e-6)
  total = 2 * BATCH * LENGTH
  assert kept < total
  np.testing.assert_allclose(float(m["dropped"]), 1 - kept / total, rtol=1e-6)


def test_eval_mode_uses_eval_capacity_factor():
  layer = _moe(capacity_factor=0.5, eval_capacity_factor=2.0)  # C = 2 (train), 8 (eval)
  x = _x(12)
  assert float(apply(layer, x, None)[1]["dropped"]) == 0.0
  assert float(apply(layer, x, jax.random.PRNGKey(0))[1]["dropped"]) > 0.0


@pytest.mark.parametrize("train", [False, True])
def test_capacity_one_with_tied_routing(train):
  # Zero router: all logits tie, so argmax gives expert 0 (first) and 1 (second) for
  # every token, with gates 1/2 each. C = 1: only the first token of each group
  # gets in (expert 0 slot 0 and expert 1 slot 0); every other token is dropped
  # twice and its output is exactly 0, so the residual block passes it through.
  layer = _moe(capacity_factor=0.01, eval_capacity_factor=0.01)
  layer.router[...] = jnp.zeros_like(layer.router[...])
  assert routing.capacity(GROUP, E, 2, 0.01) == 1
  x = _x(5)
  # In train mode random routing is on: 2 * g2 = 1 > u always keeps the second choice.
  layer = _with_moe(layer, random_routing=True)
  y, m = apply(layer, x, jax.random.PRNGKey(3) if train else None)
  yg = np.asarray(y).reshape(-1, GROUP, EMB)
  xg = np.asarray(x).reshape(-1, GROUP, EMB)
  for g in range(yg.shape[0]):
    want0 = 0.5 * _np_expert(layer, 0, xg[g, 0]) + 0.5 * _np_expert(layer, 1, xg[g, 0])
    np.testing.assert_allclose(yg[g, 0], want0, rtol=1e-4, atol=1e-6)
    assert np.all(yg[g, 1:] == 0.0)
  num_groups = BATCH * LENGTH // GROUP
  expected = 1.0 - (2 * num_groups) / (2 * BATCH * LENGTH)  # 1 - 1/S
  np.testing.assert_allclose(float(m["dropped"]), expected, rtol=1e-6)
  np.testing.assert_allclose(m["load"], [0.5, 0.5, 0.0, 0.0])
  np.testing.assert_allclose(float(m["aux_loss"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(m["z_loss"]), math.log(E) ** 2, rtol=1e-6)
  # The same numbers captured from an eager (un-jitted) call.
  _, sown = nnx.capture(layer, nnx.Intermediate)(x, jax.random.PRNGKey(3) if train else None)
  sown = sown["router_metrics"].get_value()[-1]
  np.testing.assert_allclose(float(sown["dropped"]), expected, rtol=1e-6)


def test_block_passes_dropped_tokens_through_the_residual():
  lcfg = _layer_cfg()
  moe_cfg = moe_lib.MoEConfig(num_experts=E, group_size=GROUP, capacity_factor=0.01,
                              eval_capacity_factor=0.01)
  block = stack.Block(lcfg, cross_attention=False, causal=False, rngs=nnx.Rngs(0),
                      moe=moe_cfg)
  block.ffn.router[...] = jnp.zeros_like(block.ffn.router[...])
  x = _x(6)
  positions = transformer.default_positions(x[..., 0])
  mask = attention.causal_mask(positions, positions)
  out = block(x, mask, positions)
  h = block.attn(block.attn_norm(x), block.attn_norm(x), mask, positions, positions)
  after_attn = np.asarray(x + h).reshape(-1, GROUP, EMB)
  np.testing.assert_array_equal(np.asarray(out).reshape(-1, GROUP, EMB)[:, 1:],
                                after_attn[:, 1:])
  assert not np.allclose(np.asarray(out).reshape(-1, GROUP, EMB)[:, 0], after_attn[:, 0])


@pytest.mark.parametrize("router", ["gshard_top2", "dropless"])
def test_router_logits_stay_float32_under_bfloat16(router):
  f32 = _moe(router, capacity_factor=2.0, eval_capacity_factor=2.0,
             dropless_impl="sorted_blocks", block_size=8)
  bf16 = moe_lib.MoEFeedForward(_layer_cfg(jnp.bfloat16), f32.moe, rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  x = _x(7)
  xb = x.astype(jnp.bfloat16)
  assert bf16.router_logits(xb, None).dtype == jnp.float32
  assert bf16.router_logits(xb.reshape(-1, GROUP, EMB), None).dtype == jnp.float32
  y, m = apply(bf16, xb, jax.random.PRNGKey(0))
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(m))
  want, m32 = apply(f32, xb.astype(jnp.float32), jax.random.PRNGKey(0))
  # The same routing: float32 logits from the same (bf16) inputs pick the same
  # experts, so every expert gets the same share of the tokens.
  np.testing.assert_array_equal(np.asarray(m["load"]), np.asarray(m32["load"]))
  assert np.all(np.isfinite(np.asarray(y, np.float32)))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05 * float(
      jnp.max(jnp.abs(want))))


def test_jitter_multiplies_router_input_in_train_mode_only():
  eps = 0.1
  layer = _moe("switch_top1", jitter_noise=eps)
  x = _x(8).reshape(-1, GROUP, EMB)
  w = layer.router[...]
  np.testing.assert_allclose(layer.router_logits(x, None), jnp.einsum("gsm,me->gse", x, w),
                             rtol=1e-6)
  rng = jax.random.PRNGKey(4)
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  assert float(jnp.min(noise)) >= 1 - eps and float(jnp.max(noise)) <= 1 + eps
  np.testing.assert_allclose(layer.router_logits(x, rng),
                             jnp.einsum("gsm,me->gse", x * noise, w), rtol=1e-5, atol=1e-6)
  assert not np.allclose(layer.router_logits(x, rng), layer.router_logits(x, None))


def test_dropless_layer_runs_the_impl_auto_picks_on_cpu():
  # The mapping itself: tests/test_hopper_ragged_dot.py.
  layer = _moe(router="dropless", top_k=2, block_size=4)
  assert layer.moe.dropless_impl == "auto"
  for impl, has_ragged_dot in (("auto", False), ("ragged_dot", True)):
    graphdef, state = nnx.split(_with_moe(layer, dropless_impl=impl))
    jaxpr = str(jax.make_jaxpr(_apply_pure, static_argnums=0)(graphdef, state, _x(), None))
    assert ("ragged_dot" in jaxpr) == has_ragged_dot, impl


@pytest.mark.parametrize("router,impl", [("gshard_top2", None), ("switch_top1", None),
                                         ("dropless", "ragged_dot"),
                                         ("dropless", "sorted_blocks")])
def test_gradients_reach_router_and_skip_unused_experts(router, impl):
  # Feature 0 of every token is a large constant and router[0, E-1] very negative:
  # expert E-1 is never among the top 2 (or top 1). Capacity is ample.
  layer = _with_moe(_moe(router, seed=5, capacity_factor=4.0, eval_capacity_factor=4.0),
                    random_routing=True, dropless_impl=impl or "ragged_dot", block_size=8)
  router_w = np.asarray(layer.router[...]).copy()
  router_w[0, :] = 0.0
  router_w[0, E - 1] = -20.0
  layer.router[...] = jnp.asarray(router_w)
  x = np.asarray(_x(9)).copy()
  x[..., 0] = 5.0
  x = jnp.asarray(x)
  target = _x(10)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    y, sown = nnx.capture(m, nnx.Intermediate)(x, jax.random.PRNGKey(5))
    metrics = sown["router_metrics"].get_value()[-1]
    return jnp.sum((y - target) ** 2) + 0.01 * metrics["aux_loss"], metrics["load"]

  grads, load = jax.grad(loss, has_aux=True)(params)
  assert float(load[E - 1]) == 0.0 and all(float(v) > 0 for v in load[:E - 1])
  assert float(jnp.max(jnp.abs(grads["router"][...]))) > 0
  for name in ("wi", "wo"):
    g = grads[name][...]
    assert np.all(np.asarray(g[E - 1]) == 0.0), name
    for e in range(E - 1):
      assert float(jnp.max(jnp.abs(g[e]))) > 0, (name, e)


def test_expert_choice_layer_and_decoder_refusal():
  layer = _moe("expert_choice", capacity_factor=1.0, eval_capacity_factor=1.0)
  x = _x(11)
  y, m = apply(layer, x, None)
  cap = routing.capacity(GROUP, E, 1, 1.0)
  xg = np.asarray(x, np.float64).reshape(-1, GROUP, EMB)
  probs = _np_softmax(xg @ np.asarray(layer.router[...], np.float64))
  want = np.zeros_like(xg)
  for g in range(xg.shape[0]):
    for e in range(E):
      for s in np.argsort(-probs[g, :, e], kind="stable")[:cap]:
        want[g, s] += probs[g, s, e] * _np_expert(layer, e, xg[g, s])
  np.testing.assert_allclose(np.asarray(y).reshape(xg.shape), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["load"], np.full(E, 1 / E))
  cfg = transformer.TransformerConfig(moe_every=1, moe=moe_lib.MoEConfig(router="expert_choice"))
  with pytest.raises(ValueError, match="encoder"):
    nnx.eval_shape(lambda: transformer.build(cfg, nnx.Rngs(0)))
