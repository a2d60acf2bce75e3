"""MoE routers (bigjax.models.routing) against a plain per-token loop reference.

The reference below is written from the spec (GShard Alg. 1, Switch, expert
choice, dropless top-k) in numpy, one token at a time, without calling the
library: first choices are placed before any second choice, each expert's
position counter keeps counting past the capacity C, a choice finding its
expert full is dropped, and the second choice is only sent if 2*g2 > u.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.models import routing


# --------------------------------------------------------------------------
# Reference (numpy, loops)
# --------------------------------------------------------------------------


def _softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=-1, keepdims=True)


def _logsumexp(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1)
  return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


def ref_z_loss(logits):
  return float(np.mean(_logsumexp(logits) ** 2))


def _ref_aux(probs, first):
  """E * sum_e f_e P_e per group (f_e from first choices before capacity), group mean."""
  g_count, s_count, e_count = probs.shape
  per_group = []
  for g in range(g_count):
    total = 0.0
    for e in range(e_count):
      f_e = sum(1 for s in range(s_count) if first[g][s] == e) / s_count
      p_e = sum(probs[g, s, e] for s in range(s_count)) / s_count
      total += f_e * p_e
    per_group.append(e_count * total)
  return float(np.mean(per_group))


def _top2(p):
  """(e1, g1, e2, g2) for one token, the lowest index winning ties (as argmax)."""
  e1 = int(np.argmax(p))
  rest = [p[e] if e != e1 else -1.0 for e in range(len(p))]
  e2 = int(np.argmax(rest))
  g1, g2 = p[e1], p[e2]
  return e1, g1 / (g1 + g2), e2, g2 / (g1 + g2)


def ref_gshard_top2(logits, cap, u=None):
  """GShard top-2 with a per-expert position counter, one token at a time."""
  logits = np.asarray(logits, np.float32)
  g_count, s_count, e_count = logits.shape
  probs = _softmax(logits)
  dispatch = np.zeros((g_count, s_count, e_count, cap), np.float32)
  combine = np.zeros((g_count, s_count, e_count, cap), np.float64)
  routed = kept = 0
  dropped_choices = []  # (g, s, which choice)
  first = []
  for g in range(g_count):
    choices = [_top2(probs[g, s]) for s in range(s_count)]
    first.append([c[0] for c in choices])
    counter = [0] * e_count
    for s in range(s_count):  # All first choices, in token order ...
      e1, g1, _, _ = choices[s]
      routed += 1
      if counter[e1] < cap:
        dispatch[g, s, e1, counter[e1]] = 1
        combine[g, s, e1, counter[e1]] = g1
        kept += 1
      else:
        dropped_choices.append((g, s, 1))
      counter[e1] += 1  # Keeps counting past C.
    for s in range(s_count):  # ... then the second choices.
      _, _, e2, g2 = choices[s]
      if u is not None and not 2.0 * g2 > u[g, s]:
        continue  # Random routing: not sent at all.
      routed += 1
      if counter[e2] < cap:
        dispatch[g, s, e2, counter[e2]] = 1
        combine[g, s, e2, counter[e2]] = g2
        kept += 1
      else:
        dropped_choices.append((g, s, 2))
      counter[e2] += 1
  load = dispatch.sum(axis=(0, 1, 3))
  load = load / max(load.sum(), 1.0)
  return dict(dispatch=dispatch, combine=combine, aux_loss=_ref_aux(probs, first),
              z_loss=ref_z_loss(logits), routed=routed, kept=kept, load=load,
              dropped_choices=dropped_choices)


def ref_switch_top1(logits, cap):
  logits = np.asarray(logits, np.float32)
  g_count, s_count, e_count = logits.shape
  probs = _softmax(logits)
  dispatch = np.zeros((g_count, s_count, e_count, cap), np.float32)
  combine = np.zeros((g_count, s_count, e_count, cap), np.float64)
  routed = kept = 0
  first = []
  for g in range(g_count):
    counter = [0] * e_count
    first.append([])
    for s in range(s_count):
      e = int(np.argmax(probs[g, s]))
      first[-1].append(e)
      routed += 1
      if counter[e] < cap:
        dispatch[g, s, e, counter[e]] = 1
        combine[g, s, e, counter[e]] = probs[g, s, e]  # p_max, not renormalised.
        kept += 1
      counter[e] += 1
  load = dispatch.sum(axis=(0, 1, 3))
  load = load / max(load.sum(), 1.0)
  return dict(dispatch=dispatch, combine=combine, aux_loss=_ref_aux(probs, first),
              z_loss=ref_z_loss(logits), routed=routed, kept=kept, load=load)


def ref_expert_choice(logits, cap):
  logits = np.asarray(logits, np.float32)
  g_count, s_count, e_count = logits.shape
  cap = min(cap, s_count)
  probs = _softmax(logits)
  dispatch = np.zeros((g_count, s_count, e_count, cap), np.float32)
  combine = np.zeros((g_count, s_count, e_count, cap), np.float64)
  for g in range(g_count):
    for e in range(e_count):
      order = np.argsort(-probs[g, :, e], kind="stable")[:cap]  # expert e's top-C tokens
      for c, s in enumerate(order):
        dispatch[g, s, e, c] = 1
        combine[g, s, e, c] = probs[g, s, e]
  load = dispatch.sum(axis=(0, 1, 3))
  return dict(dispatch=dispatch, combine=combine, aux_loss=0.0, z_loss=ref_z_loss(logits),
              routed=g_count * s_count, kept=(dispatch.sum(axis=(2, 3)) > 0).sum(),
              load=load / load.sum())


def ref_topk_dropless(logits, k):
  logits = np.asarray(logits, np.float32)
  t_count, e_count = logits.shape
  probs = _softmax(logits)
  experts = np.zeros((t_count, k), np.int32)
  gates = np.zeros((t_count, k), np.float64)
  counts = np.zeros(e_count)
  for t in range(t_count):
    order = np.argsort(-probs[t], kind="stable")[:k]
    chosen = probs[t, order]
    experts[t] = order
    gates[t] = chosen if k == 1 else chosen / chosen.sum()
    for e in order:
      counts[e] += 1
  return dict(experts=experts, gates=gates,
              aux_loss=_ref_aux(probs[None], [list(experts[:, 0])]),
              z_loss=ref_z_loss(logits), load=counts / counts.sum())


def _check(got, want, dispatch_only=False):
  np.testing.assert_array_equal(np.asarray(got.dispatch), want["dispatch"])
  np.testing.assert_allclose(np.asarray(got.combine), want["combine"], rtol=1e-5, atol=1e-7)
  if dispatch_only:
    return
  np.testing.assert_allclose(float(got.aux_loss), want["aux_loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(got.z_loss), want["z_loss"], rtol=1e-5)
  assert float(got.routed) == want["routed"]
  assert float(got.kept) == want["kept"]
  np.testing.assert_allclose(np.asarray(got.load), want["load"], rtol=1e-6, atol=1e-7)
  assert got.combine.dtype == jnp.float32
  assert got.aux_loss.dtype == jnp.float32 and got.z_loss.dtype == jnp.float32


# Jitted routers (op-by-op dispatch is slow); capacity and k are static.
gshard_top2 = jax.jit(routing.gshard_top2, static_argnums=1, static_argnames="random_routing")
switch_top1 = jax.jit(routing.switch_top1, static_argnums=1)
expert_choice = jax.jit(routing.expert_choice, static_argnums=1)
topk_dropless = jax.jit(routing.topk_dropless, static_argnums=1)


def _logits(seed, shape, scale=1.5, dtype=np.float32):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


# (G, S, E, capacity_factor): the small factors force drops.
SHAPES = [(2, 8, 4, 0.5), (3, 16, 8, 0.25), (1, 10, 4, 2.0), (4, 12, 6, 0.75)]


# --------------------------------------------------------------------------
# GShard top-2
# --------------------------------------------------------------------------


@pytest.mark.parametrize("g,s,e,cf", SHAPES)
def test_gshard_top2_matches_loop_reference(g, s, e, cf):
  logits = _logits(g * 100 + s, (g, s, e))
  cap = routing.capacity(s, e, 2, cf)
  want = ref_gshard_top2(logits, cap)
  _check(gshard_top2(jnp.asarray(logits), cap, rng=None), want)
  # random_routing=False ignores the key.
  _check(gshard_top2(jnp.asarray(logits), cap, rng=jax.random.PRNGKey(3),
                             random_routing=False), want)
  if cf < 1.0:
    assert want["dropped_choices"], "capacity should be small enough to drop"


@pytest.mark.parametrize("g,s,e,cf", SHAPES)
def test_gshard_top2_random_routing_matches_loop_reference(g, s, e, cf):
  logits = _logits(g * 7 + s, (g, s, e), scale=1.0)
  cap = routing.capacity(s, e, 2, cf)
  rng = jax.random.PRNGKey(g + s)
  u = np.asarray(jax.random.uniform(rng, (g, s), jnp.float32))  # The library's draw.
  want = ref_gshard_top2(logits, cap, u=u)
  got = gshard_top2(jnp.asarray(logits), cap, rng=rng, random_routing=True)
  _check(got, want)


def test_random_routing_skips_some_second_choices():
  g, s, e = 4, 32, 8
  logits = _logits(0, (g, s, e), scale=2.0)
  cap = routing.capacity(s, e, 2, 4.0)  # ample: nothing dropped for lack of room
  got = gshard_top2(jnp.asarray(logits), cap, rng=jax.random.PRNGKey(0))
  det = gshard_top2(jnp.asarray(logits), cap, rng=None)
  assert float(det.routed) == 2 * g * s == float(det.kept)
  assert g * s < float(got.routed) < 2 * g * s
  assert float(got.kept) == float(got.routed)  # Skipped choices are not "dropped".
  # Every first choice is still placed; only second choices go.
  first = jnp.argmax(logits, axis=-1)
  placed = jnp.sum(got.dispatch, axis=-1)
  assert bool(jnp.all(jnp.take_along_axis(placed, first[..., None], -1) == 1))


def test_router_math_is_float32_for_bfloat16_logits():
  logits = _logits(1, (2, 8, 4)).astype(jnp.bfloat16)
  cap = routing.capacity(8, 4, 2, 1.0)
  got = gshard_top2(jnp.asarray(logits), cap)
  assert got.combine.dtype == jnp.float32
  _check(got, ref_gshard_top2(np.asarray(jnp.asarray(logits).astype(jnp.float32)), cap))


def test_first_choices_have_priority_over_earlier_second_choices():
  # Token 0: first expert 0, second expert 1. Token 1: first expert 1, second expert 2.
  logits = jnp.array([[[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])
  r = gshard_top2(logits, 1)
  want = np.zeros((1, 2, 3, 1))
  want[0, 0, 0, 0] = 1  # token 0 -> expert 0
  want[0, 1, 1, 0] = 1  # token 1's FIRST choice takes expert 1's only slot ...
  want[0, 1, 2, 0] = 1  # ... and its second choice expert 2.
  np.testing.assert_array_equal(r.dispatch, want)  # token 0's second choice is dropped
  g1 = 1.0 / (1.0 + math.exp(-1.0))  # renormalised top-2 gate, not rescaled after a drop
  np.testing.assert_allclose(r.combine[0, 0, 0, 0], g1, rtol=1e-6)
  np.testing.assert_allclose(r.combine[0, 1, 1, 0], g1, rtol=1e-6)
  np.testing.assert_allclose(r.combine[0, 1, 2, 0], 1 - g1, rtol=1e-6)
  assert float(r.routed) == 4 and float(r.kept) == 3


def test_token_with_both_choices_dropped_gets_no_slot():
  # All tokens prefer expert 0 then expert 1; capacity 1 leaves tokens 1.. with nothing.
  logits = jnp.tile(jnp.array([3.0, 2.0, 0.0, -1.0]), (1, 5, 1))
  r = gshard_top2(logits, 1)
  assert float(jnp.sum(r.dispatch[0, 0])) == 2
  np.testing.assert_array_equal(r.dispatch[0, 1:], 0)
  np.testing.assert_array_equal(r.combine[0, 1:], 0)
  # Token 0's second choice (expert 1) took slot 0 after the overflowing first choices.
  assert float(r.dispatch[0, 0, 1, 0]) == 1
  assert float(r.kept) == 2 and float(r.routed) == 10


def test_second_choice_is_another_expert_even_when_probs_underflow():
  # exp(-200) underflows to 0 in float32: every other expert has probability 0.
  logits = jnp.array([[[200.0, 0.0, 0.0, 0.0], [0.0, 200.0, 0.0, 0.0]]])
  r = gshard_top2(logits, 4)
  np.testing.assert_array_equal(jnp.sum(r.dispatch, -1)[0], [[1, 1, 0, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(jnp.sum(r.combine, -1)[0], [[1, 0, 0, 0], [0, 1, 0, 0]])
  _check(r, ref_gshard_top2(np.asarray(logits), 4))
  np.testing.assert_array_equal(topk_dropless(logits[0], 2).experts, [[0, 1], [1, 0]])


def test_tied_logits_pick_lowest_experts():
  g, s, e = 2, 6, 4
  r = gshard_top2(jnp.zeros((g, s, e)), s)  # ample capacity
  np.testing.assert_array_equal(jnp.sum(r.dispatch, axis=-1)[..., 0], 1)
  np.testing.assert_array_equal(jnp.sum(r.dispatch, axis=-1)[..., 1], 1)
  np.testing.assert_array_equal(jnp.sum(r.dispatch, axis=-1)[..., 2:], 0)
  np.testing.assert_allclose(jnp.sum(r.combine, axis=(2, 3)), 1.0)  # 0.5 + 0.5


# --------------------------------------------------------------------------
# Capacity, aux loss, z-loss
# --------------------------------------------------------------------------


def test_capacity_rounding():
  assert routing.capacity(10, 4, 2, 1.0) == 5
  assert routing.capacity(10, 4, 2, 0.3) == 2  # ceil(1.5)
  assert routing.capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
  assert routing.capacity(256, 8, 2, 1.25) == 80
  assert routing.capacity(32, 8, 2, 0.5) == 4
  assert routing.capacity(8, 8, 1, 1.0) == 1
  # Never more slots than the group's tokens: an expert gets each token at most once.
  assert routing.capacity(8, 2, 2, 2.0) == 8  # not 16
  assert routing.capacity(4, 1, 1, 1.5) == 4


def test_capacity_is_never_below_one():
  assert routing.capacity(4, 64, 1, 0.1) == 1
  assert routing.capacity(8, 8, 2, 0.0) == 1
  assert routing.capacity(1, 1000, 1, 1e-6) == 1


@pytest.mark.parametrize("e", [4, 6])
def test_aux_loss_is_one_for_uniform_logits(e):
  logits = jnp.zeros((3, 12, e))
  for r in (gshard_top2(logits, 4), switch_top1(logits, 4),
            gshard_top2(logits, 4, rng=jax.random.PRNGKey(0))):
    np.testing.assert_allclose(float(r.aux_loss), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(topk_dropless(logits[0], 2).aux_loss), 1.0,
                             rtol=1e-6)
  if e == 4:  # 1/E exact in float32: the loss is exactly 1.
    assert float(gshard_top2(logits, 4).aux_loss) == 1.0


def test_aux_loss_is_one_for_balanced_first_choices():
  # Each expert is the first choice of S/E tokens: E * sum_e (1/E) P_e = sum_e P_e = 1
  # whatever the probabilities.
  e, s = 4, 8
  rng = np.random.default_rng(0)
  logits = np.zeros((1, s, e), np.float32)
  for t in range(s):
    logits[0, t] = rng.normal(size=e) * 0.3
    logits[0, t, t % e] = 3.0 + rng.random()
  r = gshard_top2(jnp.asarray(logits), 2)
  np.testing.assert_allclose(float(r.aux_loss), 1.0, rtol=1e-6)
  # Unbalanced (all first choices on one expert with high prob) is larger.
  logits[0, :, 0] = 5.0
  assert float(gshard_top2(jnp.asarray(logits), 2).aux_loss) > 2.0


def test_balance_loss_formula():
  probs = jnp.asarray(_softmax(_logits(5, (2, 6, 3))), jnp.float32)
  first = jax.nn.one_hot(jnp.argmax(probs, -1), 3)
  want = _ref_aux(np.asarray(probs, np.float64), np.argmax(np.asarray(probs), -1).tolist())
  np.testing.assert_allclose(float(routing.balance_loss(probs, first)), want, rtol=1e-6)


def test_z_loss_formula():
  np.testing.assert_allclose(float(routing.z_loss(jnp.zeros((1, 1, 2)))), math.log(2) ** 2,
                             rtol=1e-6)
  logits = jnp.array([[[1.0, 2.0, 3.0]], [[0.0, 0.0, -1.0]]])
  lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(2 + math.exp(-1))]
  np.testing.assert_allclose(float(routing.z_loss(logits)), (lse[0] ** 2 + lse[1] ** 2) / 2,
                             rtol=1e-6)
  big = _logits(9, (3, 5, 7), scale=4.0)
  np.testing.assert_allclose(float(routing.z_loss(jnp.asarray(big))), ref_z_loss(big),
                             rtol=1e-5)


# --------------------------------------------------------------------------
# Switch top-1, expert choice, dropless
# --------------------------------------------------------------------------


@pytest.mark.parametrize("g,s,e,cf", SHAPES)
def test_switch_top1_matches_loop_reference(g, s, e, cf):
  logits = _logits(g * 31 + s, (g, s, e))
  cap = routing.capacity(s, e, 1, cf)
  want = ref_switch_top1(logits, cap)
  _check(switch_top1(jnp.asarray(logits), cap), want)
  if cf <= 0.5:
    assert want["kept"] < want["routed"]


@pytest.mark.parametrize("g,s,e,cf", SHAPES)
def test_expert_choice_matches_numpy_top_c(g, s, e, cf):
  logits = _logits(g * 13 + s, (g, s, e))
  cap = routing.capacity(s, e, 1, cf)
  want = ref_expert_choice(logits, cap)
  got = expert_choice(jnp.asarray(logits), cap)
  _check(got, want)
  # Balanced by construction: every expert takes exactly C tokens of every group.
  np.testing.assert_array_equal(jnp.sum(got.dispatch, axis=(1, 3)), min(cap, s))


def test_expert_choice_capacity_capped_at_group_size():
  logits = _logits(2, (1, 4, 2))
  got = expert_choice(jnp.asarray(logits), 10)
  assert got.dispatch.shape == (1, 4, 2, 4)
  np.testing.assert_array_equal(jnp.sum(got.dispatch, axis=(2, 3)), 2)  # all to all


@pytest.mark.parametrize("t,e,k", [(16, 4, 1), (16, 4, 2), (40, 8, 2), (24, 8, 3)])
def test_topk_dropless_matches_loop_reference(t, e, k):
  logits = _logits(t + e + k, (t, e))
  want = ref_topk_dropless(logits, k)
  got = topk_dropless(jnp.asarray(logits), k)
  np.testing.assert_array_equal(got.experts, want["experts"])
  np.testing.assert_allclose(got.gates, want["gates"], rtol=1e-5)
  np.testing.assert_allclose(float(got.aux_loss), want["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(float(got.z_loss), want["z_loss"], rtol=1e-5)
  np.testing.assert_allclose(got.load, want["load"], rtol=1e-6)
  assert got.gates.dtype == jnp.float32


def test_dropless_equals_capacity_routers_when_nothing_is_dropped():
  s, e = 12, 4
  logits = jnp.asarray(_logits(4, (1, s, e)))
  top2 = gshard_top2(logits, s)  # C = S: nothing can drop
  d2 = topk_dropless(logits[0], 2)
  gate_of = jnp.sum(top2.combine[0], axis=-1)  # [S, E]
  np.testing.assert_allclose(jnp.take_along_axis(gate_of, d2.experts, -1), d2.gates,
                             rtol=1e-6)
  np.testing.assert_allclose(float(top2.aux_loss), float(d2.aux_loss), rtol=1e-6)
  top1 = switch_top1(logits, s)
  d1 = topk_dropless(logits[0], 1)
  gate_of = jnp.sum(top1.combine[0], axis=-1)
  np.testing.assert_allclose(jnp.take_along_axis(gate_of, d1.experts, -1), d1.gates,
                             rtol=1e-6)


def test_router_losses_enter_the_loss_with_their_configured_weights():
  """router_loss_sum = tokens x (aux_weight x sum of the layers' aux losses + z_weight x
  sum of their z losses): per-token means, scaled by the token count so that the
  step's division by it leaves the configured weights (distinct, so a swap shows)."""
  from bigjax import sharding, steps
  from configs import lm_moe
  config = lm_moe.get_config("runlocal")
  config.model.dropout_rate = 0.0
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = steps.create_state(setup, 0)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 259, (4, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.asarray(rng.random((4, 16)) > 0.25, jnp.float32)}
  sums = steps.loss_sums(setup.task, setup.model(state.params, state.model_state), batch,
                         jax.random.PRNGKey(1), router_weights=(0.01, 0.001))
  layers = {k: float(v) for k, v in sums["moe"].items() if k.endswith(("/aux_loss", "/z_loss"))}
  aux = sum(v for k, v in layers.items() if k.endswith("/aux_loss"))
  z = sum(v for k, v in layers.items() if k.endswith("/z_loss"))
  assert aux > 0 and z > 0 and len([k for k in layers if k.endswith("/aux_loss")]) >= 1
  np.testing.assert_allclose(float(sums["router_loss_sum"]),
                             float(batch["weights"].sum()) * (0.01 * aux + 0.001 * z),
                             rtol=1e-5)


def test_an_unknown_router_in_a_directly_built_model_names_the_choices():
  from flax import nnx
  from bigjax.models import moe, transformer
  cfg = transformer.TransformerConfig(moe_every=1, moe=moe.MoEConfig(router="top2"))
  with pytest.raises(ValueError, match="model.moe.router='top2'; choose one of"):
    transformer.build(cfg, rngs=nnx.Rngs(0))


def test_expert_choice_counts_the_tokens_no_expert_took_as_dropped():
  # One slot per expert. Experts 0 and 1 both rank token 0 first (1/3 beats 0.2 and
  # less); expert 2 takes token 1 (0.6). Tokens 2 and 3 go through no expert.
  probs = [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6], [0.25, 0.2, 0.55], [0.2, 0.3, 0.5]]
  got = expert_choice(jnp.log(jnp.asarray([probs])), 1)
  taken = np.asarray(got.dispatch).sum(axis=(2, 3))[0]
  assert taken.tolist() == [2, 1, 0, 0]
  assert float(got.routed) == 4 and float(got.kept) == 2  # dropped: half the tokens
