"""Mixture-of-experts feed-forward layers (GShard / Switch / expert choice / dropless).

Capacity-based routing follows GShard Algorithm 2: tokens are split into groups
of S tokens, routed with dense dispatch/combine tensors, and exchanged with the
experts by einsums
    dispatch  GSEC,GSM->EGCM    experts  EGCM,EMH->EGCH, EGCH,EHM->EGCM
    combine   GSEC,GECM->GSM
or (model.moe.capacity_dispatch, see capacity_dispatch_for) by a gather of each
slot's token and a scatter-add back (in float32): the same sums, other rounding,
without the S·E·C·M FLOPs.
With the experts split over the `expert` mesh axis, the dispatched tensor goes to
them by one all-to-all each way inside a shard_map (`expert_parallel.capacity`;
dropless: `expert_parallel.dropless`). Router metrics are sown as
nnx.Intermediate('router_metrics').

Padding tokens (`valid` False) take no expert capacity and add nothing to the
router losses and metrics (routing.py); the dropless router, with no capacity to
take, still runs them through their experts. Evaluation mode is `rng is None` (as for
dropout): eval capacity factor, no random routing, no jitter. The experts apply no
dropout to their hidden activations, as HF Mixtral's experts do not (the dense
MLP's hidden dropout has no counterpart here; Switch's separate "expert dropout" is
not implemented): with model.dropout_rate > 0 a MoE block keeps its attention and
residual dropout.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bigjax import sharding
from bigjax.errors import ConfigError
from bigjax.models import (dataclass_from_config, expert_parallel, grouped_ffn,
                           hopper_ragged_dot, layers, routing, row_gather)
from bigjax.sharding import constrain

DROPLESS_IMPLS = ("auto", "ragged_dot", "sorted_blocks", "hopper")
CAPACITY_DISPATCHES = ("auto", "einsum", "gather")
# The router logits' name for remat policies, which all keep them (stack.remat_policy):
# a recomputed forward pass compiles differently, and in bfloat16 its logits moved
# by ~5e-4, enough to flip a near tie and route the backward pass differently.
ROUTER_LOGITS = "moe_router_logits"
# Tokens in groups [G, S, M], and dispatched to experts [E, G, C, M].
GROUP_NAMES = ("activation_batch", "activation_length", "activation_embed")
DISPATCHED_NAMES = ("activation_exp", "activation_batch", None, "activation_embed")


def dropless_impl_for(setting: str, device, dtype, dims) -> str:
  """The grouped matmul for `model.moe.dropless_impl` on `device` for `dtype` and
  feature `dims`. XLA computes jax.lax.ragged_dot on CPU and (JAX 0.11) on GPU as
  if densely, every expert over every row: on CPU 5-6x the time of sorted_blocks;
  on an H200, in float32, the layer took 7.8x the dense MLP's time and 41 GiB
  against sorted_blocks' 5.4x and 4.6 GiB (experiments/benchmarks/moe.py; bf16 not
  yet measured). So auto picks sorted_blocks on CPU and GPU, ragged_dot on TPU.
  'hopper' (JAX's Pallas Mosaic GPU kernels, hopper_ragged_dot.py) is opt-in until
  its speed is measured."""
  unmet = hopper_ragged_dot.unmet_needs(layers.cuda_capability(device), dtype, dims)
  if setting == "hopper" and unmet:
    raise ConfigError(f"config.model.moe.dropless_impl='hopper' needs {', '.join(unmet)} (device "
                     f"{device.platform}, dtype {jnp.dtype(dtype).name}, dims {dims}); use "
                     "'auto' to pick what this device runs.")
  if setting != "auto":
    return setting
  return "ragged_dot" if device.platform == "tpu" else "sorted_blocks"


def capacity_dispatch_for(setting: str, device) -> str:
  """How `model.moe.capacity_dispatch` moves tokens to capacity slots and back on
  `device`. GShard's einsums with the dense [G, S, E, C] routing tensors cost
  2·E·C·M FLOPs per token each way, and C grows with the group size S (at groups of
  1024, ~25% of a top-2 layer's expert FLOPs); TPUs run them as matmuls. A gather of
  each slot's token and a scatter-add back move E·C·M values per group instead. On
  CPU (experiments/benchmarks/moe.py, 8,192 tokens, AMD EPYC) the layer took 1.73x
  the dense MLP's time by einsum and 1.12x by gather in groups of 1024, 1.14x and
  1.04x in groups of 128. So auto: gather on CPU; einsum on TPU and, until the
  gather is measured there, on GPU."""
  if setting != "auto":
    return setting
  return "gather" if device.platform == "cpu" else "einsum"


def slot_contents(dispatch, combine):
  """Each expert slot's token [G, E, C] int32 (0 when empty), whether it holds one
  [G, E, C] bool, and its combine weight [G, E, C], read off the dense routing
  tensors [G, S, E, C] (a slot holds at most one token): reductions over S, no M.
  The index is the product with the positions at full float32 precision (a TPU's
  default would round positions past 256; on CPU this is ~1.7x faster than argmax)."""
  positions = jnp.arange(dispatch.shape[1], dtype=jnp.float32)
  token = jnp.einsum("gsec,s->gec", dispatch, positions, precision=jax.lax.Precision.HIGHEST)
  return token.astype(jnp.int32), jnp.sum(dispatch, axis=1) > 0, jnp.sum(combine, axis=1)


def gather_dispatch(xg, token, occupied):
  """xg [G, S, M] -> [E, G, C, M]: einsum("gsec,gsm->egcm", dispatch, xg). Empty
  slots get zeros, as there: the experts (no biases) then give exact zeros for them."""
  g, e, c = token.shape
  xe = jnp.take_along_axis(xg, token.reshape(g, e * c, 1), axis=1, mode="promise_in_bounds")
  xe = jnp.where(occupied.reshape(g, e * c, 1), xe, 0)
  return xe.reshape(g, e, c, -1).transpose(1, 0, 2, 3)


def scatter_combine(ye, token, weight, group_size: int):
  """ye [E, G, C, M] -> [G, S, M]: einsum("gsec,egcm->gsm", combine, ye), summed in
  float32 as the einsum's product is. Empty slots (weight 0, token 0) add zeros."""
  e, g, c, m = ye.shape
  weighted = ye.transpose(1, 0, 2, 3).astype(jnp.float32) * weight[..., None]

  def one_group(token, weighted):  # Mapped over G: the partitioner sees a batch dim.
    return jnp.zeros((group_size, m), jnp.float32).at[token].add(weighted,
                                                                 mode="promise_in_bounds")

  y = jax.vmap(one_group)(token.reshape(g, e * c), weighted.reshape(g, e * c, m))
  return y.astype(ye.dtype)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """model.moe's settings. The field defaults are configs/common.py's moe_config
  (tested equal), for direct use; a run takes every value from its config."""
  num_experts: int = 8
  router: str = "gshard_top2"  # one of routing.ROUTERS
  top_k: int = 2  # dropless only; gshard_top2 is 2, switch_top1 is 1.
  group_size: int = 256  # S; the sequence length is used if it doesn't divide it.
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  random_routing: bool = True
  jitter_noise: float = 0.0  # Switch: router input scaled by U(1-eps, 1+eps).
  # Capacity routers' token moves: auto (gather on CPU, einsum on GPU and TPU),
  # einsum (GShard's dense dispatch/combine) or gather (a gather, a scatter-add).
  capacity_dispatch: str = "auto"
  # Grouped expert matmuls: auto (sorted_blocks on CPU and GPU, ragged_dot on TPU),
  # ragged_dot (jax.lax.ragged_dot), sorted_blocks (grouped_ffn.py) or hopper
  # (Pallas Mosaic GPU kernels on H100/H200, hopper_ragged_dot.py).
  dropless_impl: str = "auto"
  # Expert-parallel dropless exchange: auto (ragged on GPU/TPU, padded on CPU),
  # ragged (jax.lax.ragged_all_to_all) or padded (all_to_all of worst-case slots).
  dropless_exchange: str = "auto"
  block_size: int = 32  # sorted_blocks: each expert's rows are padded to whole blocks.
  aux_loss_weight: float = 0.01  # Used by the train step's loss.
  z_loss_weight: float = 0.001

  @classmethod
  def from_dict(cls, d) -> "MoEConfig":
    """From config.model.moe: every setting given, no unknown ones (a clear error)."""
    return dataclass_from_config(cls, "model.moe", d)

  @property
  def k(self) -> int:
    return routing.choices_per_token(self.router, self.top_k)


class MoEFeedForward(nnx.Module):
  """Drop-in replacement for layers.MLP: x [B, L, M] -> [B, L, M]."""

  def __init__(self, cfg: layers.LayerConfig, moe: MoEConfig, *, rngs: nnx.Rngs):
    if moe.router not in routing.ROUTERS:
      raise ValueError(f"model.moe.router={moe.router!r}; choose one of {routing.ROUTERS}.")
    if moe.dropless_impl not in DROPLESS_IMPLS:
      raise ValueError(f"model.moe.dropless_impl={moe.dropless_impl!r}; choose one of "
                       f"{DROPLESS_IMPLS}.")
    if moe.capacity_dispatch not in CAPACITY_DISPATCHES:
      raise ValueError(f"model.moe.capacity_dispatch={moe.capacity_dispatch!r}; choose one "
                       f"of {CAPACITY_DISPATCHES}.")
    if moe.dropless_exchange not in expert_parallel.EXCHANGES:
      raise ValueError(f"model.moe.dropless_exchange={moe.dropless_exchange!r}; choose one "
                       f"of {expert_parallel.EXCHANGES}.")
    self.cfg, self.moe = cfg, moe
    e, m, h = moe.num_experts, cfg.emb_dim, cfg.mlp_dim
    self.router = layers.param(rngs, layers.kernel_init(cfg), (m, e), ("embed", None),
                               cfg.param_dtype)
    init = layers.kernel_init(cfg, in_axis=-2, out_axis=-1, batch_axis=(0,))  # Per expert.
    self.wi = layers.param(rngs, init, (e, m, h), ("exp", "embed", "mlp"), cfg.param_dtype)
    self.wi_gate = nnx.data(
        layers.param(rngs, init, (e, m, h), ("exp", "embed", "mlp"), cfg.param_dtype)
        if cfg.gated_mlp else None)
    self.wo = layers.param(rngs, layers.residual_init(cfg, batch_axis=(0,)), (e, h, m),
                           ("exp", "mlp", "embed"), cfg.param_dtype)

  # -- shared pieces ----------------------------------------------------------

  def router_logits(self, x, rng):
    """float32 logits whatever the compute dtype ("selective precision", Switch)."""
    x = x.astype(jnp.float32)
    if rng is not None and self.moe.jitter_noise > 0:
      eps = self.moe.jitter_noise
      x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    logits = jnp.einsum("...m,me->...e", x, self.router[...].astype(jnp.float32))
    return checkpoint_name(logits, ROUTER_LOGITS)

  def _expert_ffn(self, xe, weights, hidden_names=None):
    """The experts' FFN on dispatched tokens xe [E, G, C, M], one matmul per expert
    over its [G*C, M] rows: a single row dimension, for the reason layers.dense
    gives (plain matmuls in the backward pass too). G stays major: same shardings.
    `hidden_names` constrains the hidden activations (none inside a shard_map)."""
    e, g, c, m = xe.shape
    rows = xe.reshape(e, g * c, m)
    act = layers.ACTIVATIONS[self.cfg.mlp_activation]
    h = jnp.einsum("enm,emh->enh", rows, weights["wi"])
    if "wi_gate" in weights:
      h = act(jnp.einsum("enm,emh->enh", rows, weights["wi_gate"])) * h
    else:
      h = act(h)
    if hidden_names is not None:
      h = constrain(h.reshape(e, g, c, -1), hidden_names).reshape(e, g * c, -1)
    out = jnp.einsum("enh,ehm->enm", h, weights["wo"])
    return out.reshape(e, g, c, m)

  def _report(self, aux, z, routed, kept, load, probs, weights):
    """Router metrics; `weights` (1 real, 0 padding, probs' shape less the experts)
    keep padding out of the entropy."""
    entropy = -jnp.sum(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1) * weights) / (
        jnp.maximum(jnp.sum(weights), 1.0))
    self.sow(nnx.Intermediate, "router_metrics", capture_noop=True, value={
        "aux_loss": aux, "z_loss": z,
        "dropped": (routed - kept) / jnp.maximum(routed, 1.0),
        "router_entropy": entropy, "load": load})

  # -- forward ----------------------------------------------------------------

  def __call__(self, x, rng=None, valid=None):
    """x [B, L, M]; valid [B, L] bool, False for padding tokens (None: all real),
    which take no expert capacity and add nothing to the router losses (routing.py)."""
    b, length, m = x.shape
    r_jitter, r_route = (None, None) if rng is None else tuple(jax.random.split(rng))
    weights = (jnp.ones((b, length), jnp.float32) if valid is None
               else valid.astype(jnp.float32))
    if routing.ROUTER_TABLE[self.moe.router].route is None:  # No capacity: dropless.
      return self._dropless(x, r_jitter, weights.reshape(-1))
    s = self.moe.group_size if length % self.moe.group_size == 0 else length
    xg = constrain(x.reshape(b * length // s, s, m), GROUP_NAMES)
    weights = weights.reshape(b * length // s, s)
    logits = self.router_logits(xg, r_jitter)
    factor = self.moe.capacity_factor if rng is not None else self.moe.eval_capacity_factor
    cap = routing.capacity(s, self.moe.num_experts, self.moe.k, factor)
    r = routing.ROUTER_TABLE[self.moe.router].route(logits, cap, r_route,
                                                     self.moe.random_routing, weights)
    self._report(r.aux_loss, r.z_loss, r.routed, r.kept, r.load, jax.nn.softmax(logits),
                 weights)
    dt = self.cfg.dtype
    by_einsum = capacity_dispatch_for(self.moe.capacity_dispatch,
                                      layers.default_device()) == "einsum"
    if by_einsum:
      xe = jnp.einsum("gsec,gsm->egcm", r.dispatch.astype(dt), xg)
    else:
      token, occupied, weight = slot_contents(r.dispatch, r.combine)
      xe = gather_dispatch(xg, token, occupied)
    parallel = expert_parallel.layout(
        xg.shape, GROUP_NAMES, sharding.logical_axes_of(self.wi), None, tokens_must_split=False)
    if parallel is not None:  # One all-to-all each way: groups -> experts -> groups.
      ye = expert_parallel.capacity(xe, self._expert_weights(), self._expert_ffn,
                                    layout=parallel)
    else:
      xe = constrain(xe, DISPATCHED_NAMES)
      ye = self._expert_ffn(xe, self._expert_weights(),
                            ("activation_exp", "activation_batch", None, "activation_mlp"))
      ye = constrain(ye, DISPATCHED_NAMES)
    if by_einsum:
      y = jnp.einsum("gsec,egcm->gsm", r.combine.astype(dt), ye)
    else:
      y = scatter_combine(ye, token, weight, s)
    y = constrain(y, ("activation_batch", "activation_length", "activation_embed"))
    return y.reshape(b, length, m)

  def _dropless(self, x, rng, weights):
    """Top-k with no capacity: choices sorted by expert, grouped matmuls. With the
    experts split over a mesh axis, expert-parallel (see expert_parallel.py).
    weights [B*L]: 1 for real tokens, 0 for padding (outside the losses)."""
    b, length, m = x.shape
    e, k = self.moe.num_experts, self.moe.k
    xt = x.reshape(b * length, m)
    parallel = expert_parallel.layout(x.shape, GROUP_NAMES,
                                      sharding.logical_axes_of(self.wi),
                                      self.moe.dropless_exchange)
    logits = self.router_logits(xt, rng)
    choice = routing.topk_dropless(logits, k, top_k=(
        jax.lax.top_k if parallel is None else expert_parallel.token_top_k(parallel)),
        valid=weights)
    n = jnp.sum(weights) * k  # Nothing is ever dropped.
    self._report(choice.aux_loss, choice.z_loss, n, n, choice.load, jax.nn.softmax(logits),
                 weights)
    device = (parallel.mesh.devices.flat[0] if parallel is not None
              else layers.default_device())
    impl = dropless_impl_for(self.moe.dropless_impl, device, self.cfg.dtype,
                             (m, self.wi.shape[-1]))
    ffn = {"ragged_dot": self._ragged_ffn, "sorted_blocks": self._blocked_ffn,
           "hopper": functools.partial(self._ragged_ffn,
                                       ragged_dot=hopper_ragged_dot.ragged_dot)}[impl]
    block = self.moe.block_size if impl == "sorted_blocks" else 1
    weights = self._expert_weights()
    if parallel is not None:
      return expert_parallel.dropless(
          x, choice.experts.reshape(b, length, k), choice.gates.reshape(b, length, k),
          weights, ffn, num_experts=e, block=block, layout=parallel)
    eo = row_gather.expert_order(choice.experts, e, block)
    ys = ffn(row_gather.to_experts(xt, eo), eo.lengths, weights)
    return row_gather.from_experts(ys, choice.gates, eo).reshape(b, length, m)

  def _expert_weights(self) -> dict:
    """The expert FFN weights in the compute dtype, by name."""
    names = ("wi", "wo") + (("wi_gate",) if self.wi_gate is not None else ())
    return {name: getattr(self, name)[...].astype(self.cfg.dtype) for name in names}

  # The grouped FFNs: ffn(rows, lengths, weights) for rows [R, M] in segments, one
  # per expert, of lengths [E] rows from row 0 on (row_gather.ExpertOrder's
  # layout); the rows past the segments are padding whose outputs are never read.

  def _ragged_ffn(self, xs, lengths, weights, ragged_dot=jax.lax.ragged_dot):
    """By `ragged_dot` (jax.lax.ragged_dot's contract), with segments of any length."""
    act = layers.ACTIVATIONS[self.cfg.mlp_activation]
    h = ragged_dot(xs, weights["wi"], lengths)
    if "wi_gate" in weights:
      h = act(ragged_dot(xs, weights["wi_gate"], lengths)) * h
    else:
      h = act(h)
    return ragged_dot(h, weights["wo"], lengths)

  def _blocked_ffn(self, xs, lengths, weights):
    """With each segment a multiple of block_size rows, multiplied in chunks of 16
    blocks, then 4, then 1 (grouped_ffn): FLOPs and memory grow with the tokens,
    not with tokens x experts as the CPU emulation of ragged_dot does."""
    bs = self.moe.block_size
    act = layers.ACTIVATIONS[self.cfg.mlp_activation]
    return grouped_ffn.grouped_ffn(xs, weights, act, jnp.cumsum(lengths) - lengths, lengths,
                                   (16 * bs, 4 * bs, bs))
