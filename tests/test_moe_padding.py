"""Padding tokens take no part in MoE routing: every router, given the real tokens
of a group among padding, routes them as it routes the real tokens alone, and a
model's real positions do not depend on the padding after them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import moe as moe_lib, routing, transformer
from bigjax.models.transformer import PAD_ID

S, E = 12, 4
REAL = np.array([0, 1, 3, 4, 6, 7, 9, 11])  # The real tokens' places in the group.


def _logits(seed=0, tokens=S):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, tokens, E)), jnp.float32)


def _valid():
  v = np.zeros((2, S), bool)
  v[:, REAL] = True
  return jnp.asarray(v)


CAPACITY_ROUTERS = {
    "gshard_top2": lambda logits, cap, valid=None: routing.gshard_top2(
        logits, cap, random_routing=False, valid=valid),
    "switch_top1": lambda logits, cap, valid=None: routing.switch_top1(logits, cap, valid=valid),
    "expert_choice": lambda logits, cap, valid=None: routing.expert_choice(logits, cap,
                                                                           valid=valid),
}


@pytest.mark.parametrize("name", sorted(CAPACITY_ROUTERS))
@pytest.mark.parametrize("cap", [1, 2, 5])  # Tight (tokens dropped) to roomy.
def test_capacity_routers_route_the_real_tokens_as_if_alone(name, cap):
  route = CAPACITY_ROUTERS[name]
  logits = _logits()
  padded = route(logits, cap, _valid())
  alone = route(logits[:, REAL], cap)  # The reference: the real tokens, no padding.
  np.testing.assert_array_equal(padded.dispatch[:, REAL], alone.dispatch)
  np.testing.assert_allclose(padded.combine[:, REAL], alone.combine, rtol=1e-6)
  pad = np.setdiff1d(np.arange(S), REAL)
  np.testing.assert_array_equal(padded.dispatch[:, pad], 0.0)  # Sent nowhere.
  for field in ("aux_loss", "routed", "kept", "load"):
    np.testing.assert_allclose(getattr(padded, field), getattr(alone, field), rtol=1e-6,
                               err_msg=field)
  # The z-loss sums over the real tokens and divides by all positions.
  np.testing.assert_allclose(padded.z_loss, alone.z_loss * len(REAL) / S, rtol=1e-6)


def test_dropless_losses_and_load_count_the_real_tokens_alone():
  logits = _logits().reshape(2 * S, E)
  valid = _valid().reshape(-1)
  padded = routing.topk_dropless(logits, 2, valid=valid)
  alone = routing.topk_dropless(logits[valid], 2)
  np.testing.assert_array_equal(padded.experts[valid], alone.experts)
  np.testing.assert_allclose(padded.gates[valid], alone.gates, rtol=1e-6)
  for field in ("aux_loss", "load"):  # One group: its balance over its real tokens.
    np.testing.assert_allclose(getattr(padded, field), getattr(alone, field), rtol=1e-6,
                               err_msg=field)
  np.testing.assert_allclose(padded.z_loss, alone.z_loss * len(REAL) / S, rtol=1e-6)


def test_balance_loss_averages_over_all_groups_a_group_of_padding_adding_nothing():
  """Each group's balance is over its real tokens; the mean is over all groups, so
  a batch's loss is the mean of its equal parts' (gradient accumulation)."""
  logits = _logits()
  valid = _valid().at[1].set(False)
  probs = jax.nn.softmax(logits, -1)
  first = jax.nn.one_hot(jnp.argmax(probs, -1), E)
  got = routing.balance_loss(probs, first, valid)
  want = routing.balance_loss(probs[:1, REAL], first[:1, REAL]) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  halves = [routing.balance_loss(probs[i:i + 1], first[i:i + 1], valid[i:i + 1])
            for i in range(2)]
  np.testing.assert_allclose(got, np.mean(halves), rtol=1e-6)


def _moe_decoder(router, scan, remat):
  # Capacity 1 per expert whether the group holds 4 tokens or 8 (ceil(2*0.25*S/4)),
  # so the real tokens alone are routed with the room they have among padding.
  moe = moe_lib.MoEConfig(num_experts=4, router=router, top_k=2, capacity_factor=0.25,
                          eval_capacity_factor=0.25, group_size=8, random_routing=False)
  cfg = transformer.TransformerConfig(vocab_size=40, num_layers=2, emb_dim=32, num_heads=4,
                                      mlp_dim=64, max_len=16, dropout_rate=0.0, moe=moe,
                                      moe_every=1, scan_layers=scan, remat_policy=remat)
  return transformer.build(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("router", ["gshard_top2", "dropless"])
@pytest.mark.parametrize("scan,remat", [(False, "none"), (False, "full"), (True, "full")])
def test_decoder_real_positions_do_not_depend_on_the_padding_after_them(router, scan, remat):
  """Right padding (a batch's shorter rows) after 4 real tokens: the real positions'
  logits, router metrics and routed counts are those of the 4 tokens alone (the
  z-loss halved: it divides by all 8 positions). GShard
  places every first choice before any second, so without the padding mask the
  padding's first choices would take the room of the real tokens' second ones."""
  model = _moe_decoder(router, scan, remat)
  real = jnp.asarray([[5, 17, 3, 29], [8, 8, 31, 2]], jnp.int32)
  padded = jnp.concatenate([real, jnp.full((2, 4), PAD_ID, jnp.int32)], axis=1)

  def run(tokens):
    logits, sown = nnx.capture(lambda m, t: m(t), nnx.Intermediate)(model, tokens)
    metrics = [v for path, var in nnx.to_flat_state(sown)
               for v in [var.get_value()[-1]] if path[-1].endswith("router_metrics")]
    return logits, metrics

  (got, got_metrics), (want, want_metrics) = run(padded), run(real)
  np.testing.assert_allclose(got[:, :4], want, rtol=2e-5, atol=2e-6)
  got_leaves = jax.tree_util.tree_leaves_with_path(got_metrics)
  want_leaves = jax.tree.leaves(want_metrics)
  assert got_leaves and len(got_leaves) == len(want_leaves)
  for (path, a), b in zip(got_leaves, want_leaves):
    if "z_loss" in jax.tree_util.keystr(path):
      b = b / 2
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_decoder_prefill_routes_as_the_forward_pass():
  """extend (decoding's prefill, padded prompts) passes the same padding mask."""
  model = _moe_decoder("gshard_top2", False, "none")
  tokens = jnp.asarray([[5, 17, 3, 29, 0, 0, 0, 0], [8, 8, 31, 2, 11, 0, 0, 0]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  logits, _ = model.extend(tokens, positions, model.init_cache(2, 8))
  np.testing.assert_allclose(logits, model(tokens), rtol=2e-5, atol=2e-6)
