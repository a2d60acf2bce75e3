"""model.moe.capacity_dispatch: the capacity routers' gather/scatter-add token moves
give what GShard's dense einsums give (the reference: the einsums over the
routers' [G, S, E, C] tensors), outputs and gradients, with slots left empty and
tokens dropped; and 'auto' picks by backend. (An unknown setting: tests/test_config_validation.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import layers, moe as moe_lib

EMB, MLP_DIM, E, GROUP = 16, 32, 4, 8


def _pair(router, capacity_factor, dtype=jnp.float32):
  """The same layer (same parameters) with each dispatch."""
  cfg = layers.LayerConfig(emb_dim=EMB, num_heads=1, num_kv_heads=1, head_dim=EMB,
                           mlp_dim=MLP_DIM, dtype=dtype)
  moe_cfg = moe_lib.MoEConfig(num_experts=E, router=router, group_size=GROUP,
                              capacity_factor=capacity_factor,
                              eval_capacity_factor=capacity_factor, capacity_dispatch="einsum")
  einsum = moe_lib.MoEFeedForward(cfg, moe_cfg, rngs=nnx.Rngs(0))
  # A router scaled up so that tokens crowd some experts: drops and empty slots.
  einsum.router[...] = jnp.asarray(np.random.default_rng(1).normal(size=(EMB, E)) * 3.0)
  gather = moe_lib.MoEFeedForward(
      cfg, dataclasses.replace(moe_cfg, capacity_dispatch="gather"), rngs=nnx.Rngs(5))
  nnx.update(gather, nnx.state(einsum, nnx.Param))
  return einsum, gather


def _loss_and_grads(layer, x, upstream, rng):
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x, rng) * upstream)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("router,capacity_factor,train", [
    ("gshard_top2", 0.5, True), ("gshard_top2", 1.25, False),
    ("switch_top1", 0.75, False), ("expert_choice", 1.0, False)])
def test_gather_dispatch_equals_the_einsums(router, capacity_factor, train):
  einsum, gather = _pair(router, capacity_factor)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 16, EMB)), jnp.float32)
  upstream = jnp.asarray(rng.normal(size=(2, 16, EMB)), jnp.float32)
  key = jax.random.PRNGKey(3) if train else None  # Training: GShard's random routing.
  (want, want_grads), (got, got_grads) = (_loss_and_grads(layer, x, upstream, key)
                                          for layer in (einsum, gather))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # The router's gradient (through the gates) is there and equal too.
  assert float(jnp.abs(want_grads[0]["router"][...]).max()) > 0
  # The cases meant: tokens dropped (in no slot) or slots left empty; tokens in
  # several slots, whose outputs the scatter-add sums.
  dispatch, _ = _routing(einsum, x)
  slots_per_token = jnp.sum(dispatch, axis=(2, 3))
  dropped = float(slots_per_token.min()) == 0
  empty = float(jnp.sum(dispatch, axis=1).min()) == 0
  assert dropped or empty
  assert float(slots_per_token.max()) == (1 if router == "switch_top1" else 2)


def _routing(layer, x):
  """The dense routing tensors of x in eval mode (dispatch, combine)."""
  from bigjax.models import routing
  s = layer.moe.group_size
  xg = x.reshape(-1, s, x.shape[-1])
  logits = layer.router_logits(xg, None)
  cap = routing.capacity(s, E, layer.moe.k, layer.moe.capacity_factor)
  if layer.moe.router == "gshard_top2":
    r = routing.gshard_top2(logits, cap, rng=None, random_routing=False)
  elif layer.moe.router == "switch_top1":
    r = routing.switch_top1(logits, cap)
  else:
    r = routing.expert_choice(logits, cap)
  return r.dispatch, r.combine


@pytest.mark.parametrize("router", ["gshard_top2", "expert_choice"])
def test_in_bfloat16_the_gather_is_as_close_to_float32_as_the_einsums(router):
  """The scatter-add sums in float32, as the einsum's product does."""
  want = _pair(router, 1.0)[0]
  einsum, gather = _pair(router, 1.0, jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, EMB)), jnp.float32)
  reference = np.asarray(want(x, None))
  error = {name: float(np.abs(np.asarray(layer(x.astype(jnp.bfloat16), None), np.float32)
                              - reference).max())
           for name, layer in (("einsum", einsum), ("gather", gather))}
  assert 0 < error["gather"] <= 1.25 * error["einsum"], error


def test_auto_picks_the_gather_on_cpu_only():
  class Device:
    def __init__(self, platform):
      self.platform = platform
  assert moe_lib.capacity_dispatch_for("auto", Device("cpu")) == "gather"
  assert moe_lib.capacity_dispatch_for("auto", Device("gpu")) == "einsum"
  assert moe_lib.capacity_dispatch_for("auto", Device("tpu")) == "einsum"
  assert moe_lib.capacity_dispatch_for("einsum", Device("cpu")) == "einsum"
  assert moe_lib.capacity_dispatch_for("gather", Device("tpu")) == "gather"

