"""Transformer stacks: a decoder-only LM, an encoder, and a T5-style encoder-decoder.

All share pre-norm residual blocks built from `layers`. Token id 0 is padding:
padded keys are masked out of attention. Logits are returned in float32.

Decoding with a key/value cache (see `bigjax.decode`): `DecoderLM.init_cache` /
`EncoderDecoder.init_cache` build the cache, a pytree of arrays with one
{"k", "v"} [batch, cache_len, kv_heads, head_dim] per self-attention layer (and,
for the encoder-decoder, the cross-attention keys/values of the encoded input,
computed once); `extend(tokens, positions, cache)` runs new tokens at the given
per-row positions, which are also their cache slots, and returns
(logits, updated cache). Evaluation mode only (no dropout, MoE eval capacity).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import dataclass_from_config, layers, moe as moe_lib
from bigjax.sharding import constrain

PAD_ID = 0
KINDS = ("decoder", "encoder", "encdec")
POSITIONS = ("learned", "rotary")
# model.remat_policy: what a block keeps from its forward pass for the backward
# pass; the rest is recomputed. "none": everything kept (no remat). "full": only
# the block's inputs (jax.checkpoint_policies.nothing_saveable). "dots_saveable":
# every matmul output. "dots_with_no_batch_dims_saveable": the projections'
# outputs but not the attention scores/probabilities (batched dots).
# "offload_dot_with_no_batch_dims": those projections, moved to host memory
# between the passes (backends with a pinned_host memory).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "offload_dot_with_no_batch_dims")


def remat_policy(name: str):
  """(whether to rematerialise, the jax.checkpoint policy) for model.remat_policy."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={name!r}; choose one of {REMAT_POLICIES}.")
  policies = jax.checkpoint_policies
  if name == "offload_dot_with_no_batch_dims":
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
      raise ValueError(f"model.remat_policy={name!r} offloads to host memory, which the "
                       f"{jax.default_backend()} backend lacks (it has {sorted(kinds)}); "
                       "use 'dots_with_no_batch_dims_saveable' instead.")
    return True, policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  return name != "none", {"none": None, "full": policies.nothing_saveable}.get(
      name, getattr(policies, name, None))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  kind: str = "decoder"
  vocab_size: int = 259
  num_layers: int = 2
  num_decoder_layers: int = 0  # encdec: 0 means num_layers.
  emb_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 means num_heads.
  head_dim: int = 0  # 0 means emb_dim // num_heads.
  mlp_dim: int = 128
  mlp_activation: str = "gelu"
  gated_mlp: bool = False
  norm: str = "layernorm"
  position: str = "learned"
  max_len: int = 128
  dropout_rate: float = 0.0
  init: str = "normal"
  init_scale: float = 0.02
  embed_init: str = "normal"  # normal (GPT-2) | unit (T5); see layers.EMBED_INITS.
  # GPT-2: residual-output kernels start scaled by 1/sqrt(residual branches).
  scale_residual_init: bool = True
  tie_embeddings: bool = True
  use_bias: bool = False  # Biases in attention and dense MLPs (GPT-2); MoE experts have none.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"  # One of REMAT_POLICIES.
  scan_layers: bool = False  # One lax.scan over the blocks; see Stack.
  moe_every: int = 0  # 0: dense. k: every k-th block's MLP is a MoE layer.
  moe: moe_lib.MoEConfig = moe_lib.MoEConfig()

  @classmethod
  def from_dict(cls, d) -> "TransformerConfig":
    """From config.model: every setting given, no unknown ones (a clear error)."""
    converted = {}
    if "moe" in d and not isinstance(d["moe"], moe_lib.MoEConfig):
      converted["moe"] = moe_lib.MoEConfig.from_dict(d["moe"])
    return dataclass_from_config(cls, "model", d, **converted)

  def layer_config(self, num_layers: int = 0, cross_attention: bool = False
                   ) -> layers.LayerConfig:
    """Layer settings for a stack of `num_layers` blocks (0: no residual scaling)."""
    if self.position not in POSITIONS:
      raise ValueError(f"model.position={self.position!r}; choose one of {POSITIONS}.")
    return layers.LayerConfig(
        emb_dim=self.emb_dim, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads or self.num_heads,
        head_dim=self.head_dim or self.emb_dim // self.num_heads,
        mlp_dim=self.mlp_dim, mlp_activation=self.mlp_activation, gated_mlp=self.gated_mlp,
        norm=self.norm, position=self.position, dropout_rate=self.dropout_rate,
        init=self.init, init_scale=self.init_scale, embed_init=self.embed_init,
        residual_init_scale=self._residual_init_scale(num_layers, cross_attention),
        use_bias=self.use_bias, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype))

  def _residual_init_scale(self, num_layers: int, cross_attention: bool) -> float:
    branches = num_layers * (3 if cross_attention else 2)
    return branches ** -0.5 if self.scale_residual_init and branches else 1.0


class Block(nnx.Module):
  """Pre-norm residual block: self-attention, optional cross-attention, feed-forward."""

  def __init__(self, cfg: layers.LayerConfig, *, cross_attention: bool, rngs: nnx.Rngs,
               moe: moe_lib.MoEConfig | None = None):
    self.dropout_rate = cfg.dropout_rate
    rotary = cfg.position == "rotary"
    self.attn_norm = layers.Norm(cfg, rngs=rngs)
    self.attn = layers.Attention(cfg, rotary_positions=rotary, rngs=rngs)
    self.cross_norm = nnx.data(layers.Norm(cfg, rngs=rngs) if cross_attention else None)
    self.cross = nnx.data(layers.Attention(cfg, rotary_positions=False, rngs=rngs)
                          if cross_attention else None)
    self.ffn_norm = layers.Norm(cfg, rngs=rngs)
    self.ffn = (moe_lib.MoEFeedForward(cfg, moe, rngs=rngs) if moe is not None
                else layers.MLP(cfg, rngs=rngs))

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None,
               cache=None):
    """With `cache` ({"self": {"k", "v"}} and, with cross-attention, "cross": the
    encoded input's keys/values) returns (x, updated cache); see Attention."""
    r = layers.split_rng(rng, 6)
    h = self.attn_norm(x)
    if cache is None:
      h = self.attn(h, h, mask, positions, positions, rng=r[0])
    else:
      h, self_cache = self.attn(h, h, mask, positions, positions, rng=r[0],
                                cache=cache["self"])
      cache = {**cache, "self": self_cache}
    x = x + layers.dropout(h, self.dropout_rate, r[1])
    if self.cross is not None:
      h = self.cross_norm(x)
      if cache is None:
        h = self.cross(h, encoded, cross_mask, rng=r[2])
      else:
        h = self.cross.attend(self.cross.project_query(h), cache["cross"]["k"],
                              cache["cross"]["v"], cross_mask, rng=r[2])
      x = x + layers.dropout(h, self.dropout_rate, r[3])
    h = self.ffn(self.ffn_norm(x), rng=r[4])
    x = x + layers.dropout(h, self.dropout_rate, r[5])
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x if cache is None else (x, cache)

  def init_cache(self, batch: int, length: int, encoded=None) -> dict:
    cache = {"self": self.attn.init_cache(batch, length)}
    if self.cross is not None:
      k, v = self.cross.project_kv(encoded)
      cache["cross"] = {"k": k, "v": v}
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


class Stack(nnx.Module):
  """num_layers blocks and a final norm; rematerialised per block (scanned: per
  unit) by `remat`, a name from REMAT_POLICIES.

  With `scan`, the blocks run as one `jax.lax.scan` over a repeating unit (one
  block, or `moe_every` blocks when dense and MoE blocks alternate) whose
  parameters are stacked along a leading `layers` axis: the compiled program
  holds one unit whatever the depth. Both layouts draw the same initial weights
  and dropout keys; `bigjax.layer_layout` maps parameter names between them.
  """

  def __init__(self, cfg: layers.LayerConfig, num_layers: int, *, cross_attention: bool,
               remat: str, rngs: nnx.Rngs, moe: moe_lib.MoEConfig | None = None,
               moe_every: int = 0, scan: bool = False):
    # GShard places MoE in every other block: with moe_every=2, blocks 1, 3, ...
    blocks = [Block(cfg, cross_attention=cross_attention, rngs=rngs,
                    moe=moe if moe_every and (i + 1) % moe_every == 0 else None)
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
    self.final_norm = layers.Norm(cfg, rngs=rngs)
    self.remat, self.remat_policy = remat_policy(remat)

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None,
               cache=None):
    """With `cache` (from init_cache) returns (x, updated cache)."""
    if self.scanned is not None:
      x, cache = self._scan(x, mask, positions, encoded, cross_mask, rng, cache)
      x = self.final_norm(x)
      return x if cache is None else (x, cache)
    if cache is not None:  # Decoding: no gradients, so no remat.
      new_cache = []
      for block, c, r in zip(self.blocks, cache, layers.split_rng(rng, len(self.blocks))):
        x, c = block(x, mask, positions, encoded, cross_mask, r, cache=c)
        new_cache.append(c)
      return self.final_norm(x), tuple(new_cache)
    for block, r in zip(self.blocks, layers.split_rng(rng, len(self.blocks))):
      if self.remat:
        x = nnx.remat(lambda b, *a: b(*a), policy=self.remat_policy)(
            block, x, mask, positions, encoded, cross_mask, r)
      else:
        x = block(x, mask, positions, encoded, cross_mask, r)
    return self.final_norm(x)

  def _scan(self, x, mask, positions, encoded, cross_mask, rng, cache):
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
          x = block(x, mask, positions, encoded, cross_mask, r)
        else:
          x, c = block(x, mask, positions, encoded, cross_mask, r, cache=unit_cache[j])
          new_cache.append(c)
      return x, (tuple(new_cache) if unit_cache is not None else None)

    def body(x, xs):
      unit_params, unit_keys, unit_cache = xs
      unit = nnx.merge(graphdef, unit_params)
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


class _Embedder(nnx.Module):
  """Token (+ learned position) embeddings and the output projection."""

  def __init__(self, cfg: TransformerConfig, lcfg: layers.LayerConfig, *, rngs: nnx.Rngs):
    self.tokens = layers.Embed(cfg.vocab_size, lcfg, rngs=rngs)
    self.positions = nnx.data(layers.PositionEmbed(cfg.max_len, lcfg, rngs=rngs)
                              if cfg.position == "learned" else None)
    self.logits_kernel = nnx.data(None if cfg.tie_embeddings else layers.param(
        rngs, layers.kernel_init(lcfg), (cfg.emb_dim, cfg.vocab_size), ("embed", "vocab"),
        lcfg.param_dtype))
    self.dropout_rate, self.dtype = cfg.dropout_rate, lcfg.dtype
    self.tied_logits_scale = layers.tied_logits_scale(lcfg)

  def embed(self, tokens, positions, rng=None):
    x = self.tokens(tokens)
    if self.positions is not None:
      x = x + self.positions(positions)
    return layers.dropout(x, self.dropout_rate, rng)

  def logits(self, x):
    if self.logits_kernel is None:
      # The factor that keeps initial logits O(1) for this embedding init.
      out = self.tokens.attend(x * self.tied_logits_scale)
    else:
      out = layers.dense(x, self.logits_kernel[...].astype(self.dtype))
      out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
    return out.astype(jnp.float32)


def default_positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _cache_len(cache) -> int:
  stack = cache["layers"]
  first = stack["scanned"][0] if isinstance(stack, dict) else stack[0]
  return first["self"]["k"].shape[-3]  # [(layers,) batch, length, kv_heads, head_dim]


def _cached_causal_mask(positions, cache_len: int):
  """[batch, 1, t, cache_len]: slot j is visible from position p iff j <= p."""
  slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32),
                           (positions.shape[0], cache_len))
  return layers.causal_mask(positions, slots)


def _at(x, logits_at):
  """x [b, t, ...] -> x [b, 1, ...] at per-row index logits_at [b] (None: all of x)."""
  if logits_at is None:
    return x
  return jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)


def _check_causal_router(cfg: TransformerConfig):
  if cfg.moe_every and cfg.moe.router == "expert_choice":
    raise ValueError("model.moe.router='expert_choice' looks at future tokens; use it "
                     "in encoders only (model.kind='encoder').")


class DecoderLM(nnx.Module):
  """Decoder-only language model: causal self-attention, padded keys masked."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.embedder = _Embedder(cfg, cfg.layer_config(), rngs=rngs)
    _check_causal_router(cfg)
    self.decoder = Stack(cfg.layer_config(cfg.num_layers), cfg.num_layers,
                         cross_attention=False, remat=cfg.remat_policy, scan=cfg.scan_layers,
                         rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def __call__(self, tokens, positions=None, rng=None):
    return self.embedder.logits(self.features(tokens, positions, rng))

  def features(self, tokens, positions=None, rng=None):
    """The final hidden states [b, t, emb] that `embedder.logits` projects."""
    positions = default_positions(tokens) if positions is None else positions
    r = layers.split_rng(rng, 2)
    x = self.embedder.embed(tokens, positions, r[0])
    mask = layers.causal_mask(positions, positions) & (tokens != PAD_ID)[:, None, None, :]
    return self.decoder(x, mask, positions, rng=r[1])

  def init_cache(self, batch: int, length: int) -> dict:
    """An empty cache for `length` positions: per layer {"self": {"k", "v"}}, and
    "valid" [batch, length], whether a slot holds a non-padding token (padded keys
    are masked, as in __call__)."""
    valid = constrain(jnp.zeros((batch, length), bool),
                      ("activation_batch", "activation_length"))
    return {"valid": valid,
            "layers": self.decoder.init_cache(batch, length)}

  def extend(self, tokens, positions, cache, logits_at=None):
    """Runs tokens [b, t] at positions [b, t] (their cache slots, < cache length)
    on top of the cache. Returns (logits [b, t, vocab], or [b, 1, vocab] at the
    per-row token index `logits_at` [b]; the updated cache)."""
    x = self.embedder.embed(tokens, positions)
    rows = jnp.arange(tokens.shape[0])[:, None]
    valid = cache["valid"].at[rows, positions].set(tokens != PAD_ID)
    mask = _cached_causal_mask(positions, _cache_len(cache)) & valid[:, None, None, :]
    x, layer_caches = self.decoder(x, mask, positions, cache=cache["layers"])
    logits = self.embedder.logits(_at(x, logits_at))
    return logits, {"valid": valid, "layers": layer_caches}


class Encoder(nnx.Module):
  """Bidirectional encoder (BERT-style) with a vocabulary head for masked-LM."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.embedder = _Embedder(cfg, cfg.layer_config(), rngs=rngs)
    self.encoder = Stack(cfg.layer_config(cfg.num_layers), cfg.num_layers,
                         cross_attention=False, remat=cfg.remat_policy, scan=cfg.scan_layers,
                         rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def encode(self, tokens, rng=None):
    positions = default_positions(tokens)
    r = layers.split_rng(rng, 2)
    valid = tokens != PAD_ID
    x = self.embedder.embed(tokens, positions, r[0])
    return self.encoder(x, layers.padding_mask(valid, valid), positions, rng=r[1])

  def __call__(self, tokens, rng=None):
    return self.embedder.logits(self.features(tokens, rng))

  def features(self, tokens, rng=None):
    return self.encode(tokens, rng)


class EncoderDecoder(Encoder):
  """T5-style encoder-decoder: one embedding table shared by both stacks and the output."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    _check_causal_router(cfg)
    super().__init__(cfg, rngs=rngs)
    num_decoder_layers = cfg.num_decoder_layers or cfg.num_layers
    self.decoder = Stack(cfg.layer_config(num_decoder_layers, cross_attention=True),
                         num_decoder_layers, cross_attention=True, remat=cfg.remat_policy,
                         scan=cfg.scan_layers,
                         rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def decode(self, encoded, encoder_tokens, decoder_tokens, positions=None, rng=None):
    return self.embedder.logits(self.decode_features(encoded, encoder_tokens, decoder_tokens,
                                                     positions, rng))

  def decode_features(self, encoded, encoder_tokens, decoder_tokens, positions=None,
                      rng=None):
    positions = default_positions(decoder_tokens) if positions is None else positions
    r = layers.split_rng(rng, 2)
    x = self.embedder.embed(decoder_tokens, positions, r[0])
    enc_valid = encoder_tokens != PAD_ID
    # Decoder inputs start with BOS, which is never padding: keys are masked by
    # causality alone, so shifted targets may end with padding safely.
    mask = layers.causal_mask(positions, positions)
    cross_mask = jnp.broadcast_to(enc_valid[:, None, None, :],
                                  (x.shape[0], 1, x.shape[1], encoded.shape[1]))
    return self.decoder(x, mask, positions, encoded, cross_mask, rng=r[1])

  def __call__(self, encoder_tokens, decoder_tokens, rng=None):
    return self.embedder.logits(self.features(encoder_tokens, decoder_tokens, rng))

  def features(self, encoder_tokens, decoder_tokens, rng=None):
    r = layers.split_rng(rng, 2)
    encoded = self.encode(encoder_tokens, r[0])
    return self.decode_features(encoded, encoder_tokens, decoder_tokens, rng=r[1])

  def init_cache(self, encoded, encoder_tokens, length: int) -> dict:
    """A cache for `length` decoder positions: per layer an empty {"self": {"k", "v"}}
    and "cross", the keys/values of `encoded` (computed once here); "enc_valid"
    [batch, enc_len] masks padded encoder tokens."""
    batch = encoded.shape[0]
    return {"enc_valid": encoder_tokens != PAD_ID,
            "layers": self.decoder.init_cache(batch, length, encoded)}

  def extend(self, decoder_tokens, positions, cache, logits_at=None):
    """As DecoderLM.extend, for the decoder (masked by causality alone, as in decode)."""
    x = self.embedder.embed(decoder_tokens, positions)
    mask = _cached_causal_mask(positions, _cache_len(cache))
    enc_valid = cache["enc_valid"]
    cross_mask = jnp.broadcast_to(enc_valid[:, None, None, :],
                                  (x.shape[0], 1, x.shape[1], enc_valid.shape[1]))
    x, layer_caches = self.decoder(x, mask, positions, cross_mask=cross_mask,
                                   cache=cache["layers"])
    logits = self.embedder.logits(_at(x, logits_at))
    return logits, {**cache, "layers": layer_caches}


def build(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.kind == "decoder":
    return DecoderLM(cfg, rngs=rngs)
  if cfg.kind == "encoder":
    return Encoder(cfg, rngs=rngs)
  if cfg.kind == "encdec":
    return EncoderDecoder(cfg, rngs=rngs)
  raise ValueError(f"model.kind={cfg.kind!r}; choose one of {KINDS}.")
