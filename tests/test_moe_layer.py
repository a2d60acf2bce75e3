"""MoEFeedForward against dense/hand-computed references, and expert parallelism.

Single-layer tests call the layer directly (eval mode is rng=None); the sharded
tests use the real train step of configs/lm_moe.py on the 8 CPU devices that
conftest forces.
"""
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax import sharding, steps
from bigjax.models import layers, moe as moe_lib, routing, stack, transformer
from configs import lm_moe

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


# --------------------------------------------------------------------------
# Single layer
# --------------------------------------------------------------------------


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
  mask = layers.causal_mask(positions, positions)
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


# --------------------------------------------------------------------------
# Expert parallelism: the train step of configs/lm_moe.py on 8 devices
# --------------------------------------------------------------------------

MESHES = {"expert8": dict(expert=8, data=1), "expert4_data2": dict(expert=4, data=2)}
# expert4_data2 with GShard's einsums (TPU's default) instead of CPU's gather dispatch.
EINSUM = "expert4_data2 einsum"
SEED = 0


def _config(**moe_overrides):
  config = lm_moe.get_config("runlocal")
  config.model.dropout_rate = 0.0
  config.model.moe.capacity_factor = 0.5  # C = ceil(2 * 0.5 * 32 / 8) = 4: drops.
  config.model.moe.random_routing = True  # Step keys do not depend on the mesh.
  config.model.moe.update(moe_overrides)
  return config


def _batch():
  toks = np.random.default_rng(0).integers(3, 259, (8, 33)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "weights": np.ones((8, 32), np.float32)}


def _setup(mesh_cfg, num_devices, config=None):
  """Task, state and the gradients/sums of the training loss under the step's key."""
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices])
  setup = steps.make_setup(config or _config(), mesh)
  state = steps.create_state(setup, seed=SEED)
  batch = jax.device_put(_batch(), {k: setup.batch_sharding() for k in _batch()})
  weights = steps.router_weights(setup)
  rng = jax.random.fold_in(state.rng, state.step)  # the train step's key for step 0

  @jax.jit
  def grads_and_sums(params, batch):
    def loss(p):
      with sharding.use_mesh_rules(setup.mesh, setup.rules):
        sums = steps.loss_sums(setup.task, setup.model(p), batch, rng, weights)
      return sums["loss_sum"] + sums["router_loss_sum"], sums
    return jax.grad(loss, has_aux=True)(params)

  grads, sums = grads_and_sums(state.params, batch)
  return dict(setup=setup, state=state, batch=batch, grads=jax.device_get(grads),
              sums=jax.device_get(sums), params=jax.device_get(state.params))


@pytest.fixture(scope="module")
def setups():
  """Builds each mesh's setup, state and gradients once, on first use."""
  cache = {}

  def get(name):
    if name == EINSUM and name not in cache:
      cache[name] = _setup(MESHES["expert4_data2"], 8, _config(capacity_dispatch="einsum"))
    if name not in cache:
      cache[name] = _setup(*((dict(data=1), 1) if name == "one" else (MESHES[name], 8)))
    return cache[name]
  return get


def test_router_metrics_show_drops(setups):
  moe = setups("one")["sums"]["moe"]
  assert set(moe) == {f"moe/decoder/blocks/1/{k}" for k in
                      ("aux_loss", "z_loss", "dropped", "router_entropy", "load")}
  assert 0.0 < float(moe["moe/decoder/blocks/1/dropped"]) < 1.0


@pytest.mark.parametrize("name", sorted(MESHES) + [EINSUM])
def test_sharded_loss_metrics_and_gradients_match_one_device(setups, name):
  got, want = setups(name), setups("one")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["params"]),
                          jax.tree.leaves(want["params"])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  for key in ("loss_sum", "router_loss_sum", "weight_sum"):
    np.testing.assert_allclose(got["sums"][key], want["sums"][key], rtol=1e-5, err_msg=key)
  for key, value in want["sums"]["moe"].items():
    np.testing.assert_allclose(got["sums"]["moe"][key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  leaves = jax.tree_util.tree_leaves_with_path(got["grads"])
  assert len(leaves) == len(jax.tree.leaves(want["grads"]))
  for (path, a), b in zip(leaves, jax.tree.leaves(want["grads"])):
    scale = float(np.max(np.abs(b)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{name} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_weights_are_split_over_the_expert_axis(setups, name):
  got = setups(name)
  mesh = got["setup"].mesh
  ffn = got["state"].params["decoder"]["blocks"][1]["ffn"]
  num_experts = _config().model.moe.num_experts
  for key in ("wi", "wo"):
    w = ffn[key]
    assert w.sharding.spec[0] == "expert", (name, key, w.sharding.spec)
    local = w.addressable_shards[0].data.shape
    assert local[0] == num_experts // mesh.shape["expert"], (name, key, local)
    assert local[1:] == w.shape[1:]
  # Adam moments of the experts follow them.
  moments = [x for p, x in jax.tree_util.tree_leaves_with_path(got["state"].opt_state)
             if jax.tree_util.keystr(p).endswith("[1]['ffn']['wi']")]
  assert len(moments) == 2 and all(x.sharding.spec[0] == "expert" for x in moments)


def _collectives_moving_tokens(hlo: str, kind: str, emb_dim: int) -> list[str]:
  """The `kind` ops ("all-to-all", "all-gather") of compiled HLO whose result holds
  token activations (arrays whose last dimension is the embedding width)."""
  found = []
  for line in hlo.splitlines():
    lhs, sep, _ = line.partition(f" {kind}(")
    if sep and any(int(shape.split(",")[-1]) == emb_dim
                   for shape in re.findall(r"f32\[([\d,]+)\]", lhs.partition("=")[2])):
      found.append(line.strip())
  return found


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_parallel_forward_moves_tokens_by_one_all_to_all_each_way(setups, name):
  # The README's claim: the dispatched tensor goes to the experts by one all-to-all
  # and comes back by one; the tokens are never gathered whole on every device.
  setup = setups(name)["setup"]
  state = setups(name)["state"]
  hlo = steps.make_eval_step(setup).lower(state.params, state.model_state,
                                           setups(name)["batch"]).compile().as_text()
  emb = setup.config.model.emb_dim
  assert not _collectives_moving_tokens(hlo, "all-gather", emb)
  assert len(_collectives_moving_tokens(hlo, "all-to-all", emb)) == 2


def test_train_step_on_expert_mesh_matches_one_device(setups):
  got, want = setups("expert8"), setups("one")
  setup = got["setup"]
  state = steps.create_state(setup, seed=SEED)  # a fresh copy: the step donates it
  new_state, metrics = steps.make_train_step(setup)(state, got["batch"])
  metrics = jax.device_get(metrics)
  assert int(new_state.step) == 1
  sums = want["sums"]
  denom = sums["weight_sum"]
  np.testing.assert_allclose(metrics["loss"], sums["loss_sum"] / denom, rtol=1e-5)
  np.testing.assert_allclose(metrics["router_loss"], sums["router_loss_sum"] / denom,
                             rtol=1e-5)
  grad_norm = math.sqrt(sum(float(np.sum(np.square(g / denom)))
                            for g in jax.tree.leaves(want["grads"])))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
  for key, value in sums["moe"].items():
    if key.endswith("/load"):
      for e, v in enumerate(value):
        np.testing.assert_allclose(metrics[f"{key}/expert_{e}"], v, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("impl", ["sorted_blocks", "ragged_dot"])
def test_dropless_on_expert_mesh_matches_one_device(impl):
  """The dropless path runs expert-parallel (tokens exchanged by all-to-all inside a
  shard_map, see tests/test_moe_expert_parallel.py). Same loss, metrics and
  gradients as one device."""
  config = _config(router="dropless", top_k=2, dropless_impl=impl, block_size=8)
  got = _setup(dict(expert=4, data=2), 8, config)
  want = _setup(dict(data=1), 1, config)
  np.testing.assert_allclose(got["sums"]["loss_sum"], want["sums"]["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(got["sums"]["router_loss_sum"], want["sums"]["router_loss_sum"],
                             rtol=1e-5)
  assert float(got["sums"]["moe"]["moe/decoder/blocks/1/dropped"]) == 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["grads"]),
                          jax.tree.leaves(want["grads"])):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{impl} {jax.tree_util.keystr(path)}")
