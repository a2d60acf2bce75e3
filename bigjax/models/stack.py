"""The residual block and the stack of blocks every Transformer kind shares.

`Stack` runs its blocks unrolled or as one `jax.lax.scan` over stacked
parameters (model.scan_layers), rematerialised per block or per scanned unit
under a named policy (model.remat_policy).
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import attention, layers, moe as moe_lib, relative_position
from bigjax.sharding import constrain

# model.remat_policy: what a block keeps from its forward pass for the backward
# pass; the rest is recomputed. "none": everything kept (no remat). "full": only
# the block's inputs (jax.checkpoint_policies.nothing_saveable). "dots_saveable":
# every matmul output. "dots_with_no_batch_dims_saveable": the projections'
# outputs but not the attention scores/probabilities (batched dots).
# "offload_dot_with_no_batch_dims": those projections, moved to host memory
# between the passes (backends with a pinned_host memory).
_POLICIES = {  # name -> the jax.checkpoint policy (offload: built for the device).
    "none": None, "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dot_with_no_batch_dims": None}
REMAT_POLICIES = tuple(_POLICIES)


def remat_policy(name: str):
  """(whether to rematerialise, the jax.checkpoint policy) for model.remat_policy."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={name!r}; choose one of {REMAT_POLICIES}.")
  if name == "offload_dot_with_no_batch_dims":
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
      raise ValueError(f"model.remat_policy={name!r} offloads to host memory, which the "
                       f"{jax.default_backend()} backend lacks (it has {sorted(kinds)}); "
                       "use 'dots_with_no_batch_dims_saveable' instead.")
    policy = _offload_policy()
  else:
    policy = _POLICIES[name]
  return name != "none", None if policy is None else _keeping_router_logits(policy)


# Both cached: the policy is static model state, so a new function per model would
# make two models of one config different graphdefs, and jitted loops that take the
# graphdef as a static argument would compile again for each.
@functools.cache
def _offload_policy():
  return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")


@functools.cache
def _keeping_router_logits(policy):
  """`policy` that also keeps the MoE router logits (moe.ROUTER_LOGITS): routing
  recomputed from recomputed logits may differ from the forward pass's."""
  router_logits = jax.checkpoint_policies.save_only_these_names(moe_lib.ROUTER_LOGITS)

  @functools.wraps(policy)
  def keep(prim, *args, **params):
    return router_logits(prim, *args, **params) or policy(prim, *args, **params)

  return keep


def is_moe_block(i: int, moe_every: int) -> bool:
  """Whether block i (from 0) is a MoE block: GShard places MoE in every
  moe_every-th block (moe_every=2: blocks 1, 3, ...); 0 means a dense model."""
  return bool(moe_every) and (i + 1) % moe_every == 0


class Block(nnx.Module):
  """Pre-norm residual block: self-attention, optional cross-attention, feed-forward."""

  def __init__(self, cfg: layers.LayerConfig, *, cross_attention: bool, causal: bool,
               rngs: nnx.Rngs, moe: moe_lib.MoEConfig | None = None):
    self.dropout_rate = cfg.dropout_rate
    rotary = cfg.position == "rotary"
    self.attn_norm = layers.Norm(cfg, rngs=rngs)
    self.attn = attention.Attention(cfg, rotary_positions=rotary, causal=causal, rngs=rngs)
    self.cross_norm = nnx.data(layers.Norm(cfg, rngs=rngs) if cross_attention else None)
    self.cross = nnx.data(attention.Attention(cfg, rotary_positions=False, rngs=rngs)
                          if cross_attention else None)
    self.ffn_norm = layers.Norm(cfg, rngs=rngs)
    self.ffn = (moe_lib.MoEFeedForward(cfg, moe, rngs=rngs) if moe is not None
                else layers.MLP(cfg, rngs=rngs))

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None,
               cache=None, bias=None, valid=None):
    """With `cache` ({"self": {"k", "v"}} and, with cross-attention, "cross": the
    encoded input's keys/values) returns (x, updated cache); see Attention. `bias`:
    the self-attention's relative position biases (Stack). `valid` [b, t]: False
    for padding tokens, which a MoE feed-forward routes to no expert."""
    r = layers.split_rng(rng, 6)
    h = self.attn_norm(x)
    if cache is None:
      h = self.attn(h, h, mask, positions, positions, rng=r[0], bias=bias)
    else:
      h, self_cache = self.attn(h, h, mask, positions, positions, rng=r[0],
                                cache=cache["self"], bias=bias)
      cache = {**cache, "self": self_cache}
    x = x + layers.dropout(h, self.dropout_rate, r[1])
    if self.cross is not None:
      h = self.cross_norm(x)
      if cache is None:
        h = self.cross(h, encoded, cross_mask, rng=r[2])
      else:
        h = self.cross.attend(self.cross.project_query(h), cache["cross"]["k"],
                              cache["cross"]["v"], cross_mask, rng=r[2], kv_heads_major=True)
      x = x + layers.dropout(h, self.dropout_rate, r[3])
    if isinstance(self.ffn, moe_lib.MoEFeedForward):
      h = self.ffn(self.ffn_norm(x), rng=r[4], valid=valid)
    else:
      h = self.ffn(self.ffn_norm(x), rng=r[4])
    x = x + layers.dropout(h, self.dropout_rate, r[5])
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x if cache is None else (x, cache)

  def init_cache(self, batch: int, length: int, encoded=None) -> dict:
    cache = {"self": self.attn.init_cache(batch, length)}
    if self.cross is not None:  # Heads major, as attention reads it: no copy per step.
      cache["cross"] = {name: constrain(x.transpose(0, 2, 1, 3), attention.CACHE_ACTIVATIONS)
                        for name, x in zip("kv", self.cross.project_kv(encoded))}
    return cache


def _stack_modules(modules: list) -> nnx.Module:
  """One module whose parameters are those of `modules` (all alike) stacked along a
  leading `layers` axis."""
  graphdef, first = nnx.split(modules[0])
  states = [first] + [nnx.split(m)[1] for m in modules[1:]]
  stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
  for _, var in nnx.iter_graph(stacked):
    if isinstance(var, nnx.Variable) and var.get_metadata("out_sharding", None):
      var.set_metadata(out_sharding=("layers",) + tuple(var.get_metadata("out_sharding")))
  return stacked


def _unit_names(unit: nnx.Module) -> nnx.Module:
  """One scan step's unit, merged from slices of the stacked parameters, with the
  leading `layers` name taken off again: code that reads a parameter's logical
  names (the MoE layer's expert-parallel layout) sees the per-layer names."""
  for _, var in nnx.iter_graph(unit):
    if isinstance(var, nnx.Variable):
      names = var.get_metadata("out_sharding", None)
      if names and names[0] == "layers":
        var.set_metadata(out_sharding=tuple(names[1:]))
  return unit


class Stack(nnx.Module):
  """num_layers blocks and a final norm; rematerialised per block (scanned: per
  unit) by `remat`, a name from REMAT_POLICIES. With cfg.position="relative", the
  stack's relative position biases, computed once per call for all its blocks.

  With `scan`, the blocks run as one `jax.lax.scan` over a repeating unit (one
  block, or `moe_every` blocks when dense and MoE blocks alternate) whose
  parameters are stacked along a leading `layers` axis: the compiled program
  holds one unit whatever the depth. Both layouts draw the same initial weights
  and dropout keys; `bigjax.layer_layout` maps parameter names between them.

  With `final_dropout` (T5's stacks, as in T5X and HF), the final norm's output
  is dropped out too; GPT-2 leaves it whole.
  """

  def __init__(self, cfg: layers.LayerConfig, num_layers: int, *, cross_attention: bool,
               causal: bool, remat: str, rngs: nnx.Rngs,
               moe: moe_lib.MoEConfig | None = None, moe_every: int = 0, scan: bool = False,
               final_dropout: bool = False):
    blocks = [Block(cfg, cross_attention=cross_attention, causal=causal, rngs=rngs,
                    moe=moe if is_moe_block(i, moe_every) else None)
              for i in range(num_layers)]
    self.unit = moe_every or 1
    if scan and num_layers % self.unit:
      raise ValueError(f"model.scan_layers scans units of model.moe_every={moe_every} "
                       f"blocks, which do not divide {num_layers} layers; make the layer "
                       "count a multiple of moe_every or set scan_layers=False.")
    self.num_layers = num_layers
    self.blocks = nnx.data(None if scan else nnx.List(blocks))
    self.scanned = nnx.data(_stack_modules(
        [nnx.List(blocks[u:u + self.unit]) for u in range(0, num_layers, self.unit)])
        if scan else None)
    self.relative_bias = nnx.data(
        relative_position.RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs)
        if cfg.position == "relative" else None)
    self.final_norm = layers.Norm(cfg, rngs=rngs)
    self.final_dropout_rate = cfg.dropout_rate if final_dropout else 0.0
    self.remat, self.remat_policy = remat_policy(remat)

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None,
               cache=None, valid=None):
    """With `cache` (from init_cache) returns (x, updated cache). `positions` [b or
    1, t]: the tokens' positions (with a cache, their slots: the keys are at 0 ..
    cache length - 1, mask's last axis). `valid` [b, t]: see Block."""
    bias = None
    if self.relative_bias is not None:
      keys = positions if cache is None else jnp.arange(mask.shape[-1])[None]
      bias = self.relative_bias(positions, keys)
    if self.scanned is not None:
      x, cache = self._scan(x, mask, positions, encoded, cross_mask, rng, cache, bias, valid)
      x = self._final(x, rng)
      return x if cache is None else (x, cache)
    if cache is not None:  # Decoding: no gradients, so no remat.
      new_cache = []
      for block, c, r in zip(self.blocks, cache, layers.split_rng(rng, len(self.blocks))):
        x, c = block(x, mask, positions, encoded, cross_mask, r, cache=c, bias=bias,
                     valid=valid)
        new_cache.append(c)
      return self._final(x, rng), tuple(new_cache)
    for block, r in zip(self.blocks, layers.split_rng(rng, len(self.blocks))):
      if self.remat:
        x = nnx.remat(lambda b, *a: b(*a), policy=self.remat_policy)(
            block, x, mask, positions, encoded, cross_mask, r, None, bias, valid)
      else:
        x = block(x, mask, positions, encoded, cross_mask, r, bias=bias, valid=valid)
    return self._final(x, rng)

  def _final(self, x, rng):
    # A key of its own (not one more split), so the blocks keep their keys.
    key = None if rng is None else jax.random.fold_in(rng, self.num_layers)
    return layers.dropout(self.final_norm(x), self.final_dropout_rate, key)

  def _scan(self, x, mask, positions, encoded, cross_mask, rng, cache, bias, valid):
    """The scanned stack: (x, updated cache or None). Router metrics of MoE blocks
    are sown once, as 'scanned_router_metrics' {'blocks/<i>': metrics}."""
    graphdef, params = nnx.split(self.scanned)
    num_units, k = self.num_layers // self.unit, self.unit
    keys = None if rng is None else jax.random.split(rng, self.num_layers).reshape(
        num_units, k, *rng.shape)

    def run_unit(unit, x, unit_keys, unit_cache):
      new_cache = []
      for j, block in enumerate(unit):
        r = None if unit_keys is None else unit_keys[j]
        if unit_cache is None:
          x = block(x, mask, positions, encoded, cross_mask, r, bias=bias, valid=valid)
        else:
          x, c = block(x, mask, positions, encoded, cross_mask, r, cache=unit_cache[j],
                       bias=bias, valid=valid)
          new_cache.append(c)
      return x, (tuple(new_cache) if unit_cache is not None else None)

    def body(x, xs):
      unit_params, unit_keys, unit_cache = xs
      unit = _unit_names(nnx.merge(graphdef, unit_params))
      (x, new_cache), sown = nnx.capture(run_unit, nnx.Intermediate)(
          unit, x, unit_keys, unit_cache)
      metrics = {path[0]: var.get_value()[-1] for path, var in nnx.to_flat_state(sown)
                 if path[-1] == "router_metrics"}
      return x, (new_cache, metrics)

    if self.remat and cache is None:  # No CSE across scan iterations to guard against.
      body = jax.checkpoint(body, policy=self.remat_policy, prevent_cse=False)
    stacked = None if cache is None else cache["scanned"]
    x, (new_cache, metrics) = jax.lax.scan(body, x, (params, keys, stacked))
    if metrics:
      self.sow(nnx.Intermediate, "scanned_router_metrics", capture_noop=True, value={
          f"blocks/{u * k + j}": jax.tree.map(lambda v: v[u], m)
          for j, m in metrics.items() for u in range(num_units)})
    return x, (None if cache is None else {"scanned": new_cache})

  def init_cache(self, batch: int, length: int, encoded=None):
    """Unscanned: a tuple of per-block caches. Scanned: {"scanned": a tuple of k
    per-block caches with a leading layers axis (one row per unit)}."""
    if self.scanned is None:
      return tuple(b.init_cache(batch, length, encoded) for b in self.blocks)
    graphdef, params = nnx.split(self.scanned)

    def one(unit_params):
      return tuple(b.init_cache(batch, length, encoded)
                   for b in nnx.merge(graphdef, unit_params))

    return {"scanned": jax.lax.map(one, params)}
