"""MoE routers as pure functions on router logits [groups G, tokens S, experts E].

Capacity-based routers return dense dispatch/combine tensors [G, S, E, C]
(GShard Algorithm 2); the dropless router returns per-token expert choices.
All routing math runs in float32 whatever the compute dtype.

Load-balancing loss (this codebase's convention, the praxis form): per group,
    aux = E * sum_e f_e * P_e
with f_e the fraction of tokens whose *first* choice is e (before capacity) and
P_e the mean router probability of e; it equals 1 under uniform routing. The
GShard paper writes the same quantity divided by E^2; flaxformer/MaxText count
all k choices (uniform routing then gives k). Groups are averaged.

Padding: every router takes `valid` [G, S] (None: all tokens real). Padding
tokens are sent to no expert and take no capacity (flaxformer's padding mask),
and the counts are over the real tokens alone, so the real tokens' routing does
not depend on what the padding holds. The losses sum over the real tokens (the
z-loss) or over each group's real tokens (the balance loss) and divide by all
positions or groups, padding included, as flaxformer's do: padding adds nothing
and dilutes them in proportion, and a batch's loss is the mean of its equal
microbatches' losses whatever padding each holds (gradient accumulation is exact).
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Router(NamedTuple):
  """What the rest of bigjax needs to know of a router: the MoE layer, config
  validation, init_from and the FLOP count all read this table."""
  # (logits [G, S, E], capacity, rng or None, random_routing, valid [G, S] or
  # None) -> Routing; None for the dropless router, which has no capacity
  # (moe.MoEFeedForward._dropless).
  route: Callable | None
  # k in the capacity C = ceil(k·capacity_factor·S/E); None: model.moe.top_k.
  k: int | None
  # Experts pick tokens (expert choice): a token's routing depends on later
  # tokens of its group, so only encoders may use it, and a token passes through
  # capacity_factor experts on average (C = ceil(cf·S/E) per expert).
  experts_choose: bool = False


def _route_gshard_top2(logits, cap, rng, random_routing, valid):
  return gshard_top2(logits, cap, rng=rng, random_routing=random_routing, valid=valid)


ROUTER_TABLE = {
    "gshard_top2": Router(_route_gshard_top2, k=2),
    "switch_top1": Router(lambda logits, cap, rng, random_routing, valid:
                          switch_top1(logits, cap, valid=valid), k=1),
    "expert_choice": Router(lambda logits, cap, rng, random_routing, valid:
                            expert_choice(logits, cap, valid=valid), k=1, experts_choose=True),
    "dropless": Router(None, k=None),
}
ROUTERS = tuple(ROUTER_TABLE)


def choices_per_token(router: str, top_k: int) -> int:
  """k in the capacity C = ceil(k·capacity_factor·S/E); `top_k` is dropless's."""
  k = ROUTER_TABLE[router].k
  return top_k if k is None else k


def experts_per_token(router: str, top_k: int, capacity_factor: float,
                      num_experts: int) -> float:
  """How many experts' MLPs a token passes through, on average (expert choice:
  at most every expert, as capacity() never exceeds the group)."""
  if ROUTER_TABLE[router].experts_choose:
    return min(capacity_factor, num_experts)
  return choices_per_token(router, top_k)


class Routing(NamedTuple):
  dispatch: jax.Array  # [G, S, E, C] 0/1: token s goes to slot c of expert e.
  combine: jax.Array  # [G, S, E, C] float32 gate weights on the same slots.
  aux_loss: jax.Array  # scalar load-balancing loss (see module docstring).
  z_loss: jax.Array  # scalar router z-loss, mean(logsumexp(logits)^2).
  # Scalar counts: real token-choices sent to an expert, and those that found
  # room (routed - dropped). Expert choice: the real tokens, and those at least
  # one expert took (the others pass the layer untouched).
  routed: jax.Array
  kept: jax.Array
  load: jax.Array  # [E] fraction of kept token-choices per expert.


def capacity(group_size: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Expert capacity C = ceil(k * capacity_factor * S / E), at least 1 and at
  most S: a token's k choices are distinct experts, so no expert is sent more
  than the group's S tokens, and slots past S would only be computed empty."""
  # The epsilon keeps float noise (1.1 * 10 / 11 = 1.0000000000000002) from
  # rounding a whole number of slots up by one.
  return min(group_size,
             max(1, math.ceil(k * capacity_factor * group_size / num_experts - 1e-9)))


def _weights(valid, logits) -> jax.Array:
  """float32 [...] 1 for real tokens, 0 for padding (valid None: all real)."""
  if valid is None:
    return jnp.ones(logits.shape[:-1], jnp.float32)
  return valid.astype(jnp.float32)


def z_loss(logits: jax.Array, valid=None) -> jax.Array:
  """logsumexp(logits)^2 summed over the real tokens, divided by all positions."""
  w = _weights(valid, logits)
  return jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * w) / w.size


def balance_loss(probs: jax.Array, first_choice: jax.Array, valid=None) -> jax.Array:
  """E * sum_e f_e P_e per group over its real tokens (0 for a group of padding),
  averaged over all groups. probs, first_choice: [G, S, E]; valid [G, S] or None."""
  num_experts = probs.shape[-1]
  w = _weights(valid, probs)
  count = jnp.sum(w, axis=1)[:, None]
  f = jnp.sum(first_choice * w[..., None], axis=1) / jnp.maximum(count, 1.0)
  p = jnp.sum(probs * w[..., None], axis=1) / jnp.maximum(count, 1.0)
  per_group = num_experts * jnp.sum(f * p, axis=-1)
  return jnp.mean(per_group)


def _slots(mask: jax.Array, offset: jax.Array, cap: int):
  """Positions in each expert's buffer for the tokens in `mask` [G, S, E], in token
  order, starting after `offset` [G, 1, E]. Returns (kept mask, one-hot slots)."""
  position = jnp.cumsum(mask, axis=1) - 1.0 + offset  # Counters keep counting past C.
  kept = mask * (position < cap)
  slot = jax.nn.one_hot(jnp.sum(position * kept, axis=-1).astype(jnp.int32), cap)
  return kept, kept[..., None] * slot[:, :, None, :]


def _load(dispatch: jax.Array) -> jax.Array:
  per_expert = jnp.sum(dispatch, axis=(0, 1, 3))
  return per_expert / jnp.maximum(jnp.sum(per_expert), 1.0)


def gshard_top2(logits, cap: int, *, rng=None, random_routing: bool = True,
                valid=None) -> Routing:
  """GShard top-2: renormalised gates; first choices placed before any second;
  the second choice kept only if 2*g2 > u (random routing, when rng is given)."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  num_experts = probs.shape[-1]
  mask1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_experts)
  gate1 = jnp.sum(probs * mask1, axis=-1)
  # Exclude the first choice by index, not by zeroing its probability: when the
  # other probabilities underflow to 0, argmax would pick the first expert again.
  probs2 = jnp.where(mask1 > 0, -1.0, probs)
  mask2 = jax.nn.one_hot(jnp.argmax(probs2, axis=-1), num_experts)
  gate2 = jnp.sum(probs * mask2, axis=-1)
  denom = gate1 + gate2
  gate1, gate2 = gate1 / denom, gate2 / denom
  w = _weights(valid, logits)[..., None]  # Padding: no choice (its gates are unused).
  mask1, mask2 = mask1 * w, mask2 * w
  aux = balance_loss(probs, mask1, valid)
  if random_routing and rng is not None:
    u = jax.random.uniform(rng, gate2.shape, jnp.float32)
    mask2 = mask2 * (2.0 * gate2 > u)[..., None]
  kept1, slots1 = _slots(mask1, jnp.zeros_like(mask1[:, :1]), cap)
  kept2, slots2 = _slots(mask2, jnp.sum(kept1, axis=1, keepdims=True), cap)
  dispatch = slots1 + slots2
  combine = gate1[..., None, None] * slots1 + gate2[..., None, None] * slots2
  return Routing(dispatch, combine, aux, z_loss(logits, valid),
                 routed=jnp.sum(mask1) + jnp.sum(mask2),
                 kept=jnp.sum(kept1) + jnp.sum(kept2), load=_load(dispatch))


def switch_top1(logits, cap: int, *, valid=None) -> Routing:
  """Switch top-1: output scaled by p_max (no renormalisation)."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  mask1 = (jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1])
           * _weights(valid, logits)[..., None])
  gate1 = jnp.max(probs, axis=-1)
  kept1, slots1 = _slots(mask1, jnp.zeros_like(mask1[:, :1]), cap)
  return Routing(slots1, gate1[..., None, None] * slots1, balance_loss(probs, mask1, valid),
                 z_loss(logits, valid), routed=jnp.sum(mask1), kept=jnp.sum(kept1),
                 load=_load(slots1))


def expert_choice(logits, cap: int, *, valid=None) -> Routing:
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the
  group by router probability. Balanced by construction (aux loss 0); a token
  may be taken by several experts or by none. Non-causal: encoder only. Padding
  tokens rank below every real token and are taken by no expert."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  group_size = probs.shape[1]
  cap = min(cap, group_size)
  w = _weights(valid, logits)
  scores = jnp.where(w[..., None] > 0, probs, -1.0)
  gates, tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), cap)  # [G, E, C]
  dispatch = jnp.swapaxes(jax.nn.one_hot(tokens, group_size), 2, 3)  # [G, E, S, C]
  dispatch = jnp.swapaxes(dispatch, 1, 2) * w[..., None, None]  # [G, S, E, C]
  combine = dispatch * gates[:, None, :, :]
  taken = jnp.sum(jnp.max(dispatch, axis=(2, 3)))  # Tokens some expert took.
  return Routing(dispatch, combine, jnp.zeros((), jnp.float32), z_loss(logits, valid),
                 routed=jnp.sum(w), kept=taken, load=_load(dispatch))


class DroplessChoice(NamedTuple):
  experts: jax.Array  # [T, k] int32 expert of each choice.
  gates: jax.Array  # [T, k] float32 weight of each choice.
  aux_loss: jax.Array
  z_loss: jax.Array
  load: jax.Array  # [E]


def topk_dropless(logits, k: int, top_k=jax.lax.top_k, valid=None) -> DroplessChoice:
  """Top-k with no capacity. k=1 scales by p_max (as Switch); k>1 renormalises the
  k gates (as GShard without random routing), so each equals its capacity twin
  when nothing is dropped. logits: [T, E]; valid [T] or None. top_k: jax.lax.top_k
  or a version of it that keeps the tokens sharded. Padding tokens still pass
  their experts (nothing competes for room), outside the losses and the load."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  gates, experts = top_k(probs, k)
  if k > 1:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  num_experts = probs.shape[-1]
  w = _weights(valid, logits)
  first = jax.nn.one_hot(experts[:, 0], num_experts)
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts) * w[:, None, None], axis=(0, 1))
  return DroplessChoice(experts, gates, balance_loss(probs[None], first[None], w[None]),
                        z_loss(logits, valid), counts / jnp.maximum(jnp.sum(counts), 1.0))
