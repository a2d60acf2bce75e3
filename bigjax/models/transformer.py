"""Transformer models: a decoder-only LM, an encoder, and a T5-style encoder-decoder.

All share the pre-norm residual blocks of `stack`. Token id 0 is padding:
padded keys are masked out of attention. Logits are returned in float32.

Decoding with a key/value cache (see `bigjax.decode`): `DecoderLM.init_cache` /
`EncoderDecoder.init_cache` build the cache, a pytree of arrays with one
{"k", "v"} [batch, kv_heads, cache_len, head_dim] per self-attention layer (and,
for the encoder-decoder, the cross-attention keys/values of the encoded input,
computed once); `extend(tokens, positions, cache)` runs new tokens at the given
per-row positions, which are also their cache slots, and returns
(logits, updated cache). Evaluation mode only (no dropout, MoE eval capacity).
"""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from bigjax.models import attention, dataclass_from_config, layers, moe as moe_lib, routing
from bigjax.models.stack import Stack
from bigjax.sharding import constrain

PAD_ID = 0  # The tokenizer's (models do not import the data layer); a test keeps them equal.
KINDS = ("decoder", "encoder", "encdec")
POSITIONS = ("learned", "rotary", "relative")
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The model's settings. The field defaults make a small float32 model for direct
  use (tests, notebooks, benchmarks); a run takes every value from its config file
  (from_dict requires them all), so configs/ stays the one source of run defaults."""
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
  norm_eps: float = 1e-6
  position: str = "learned"  # One of POSITIONS; "relative" is T5's.
  relative_buckets: int = 32  # position="relative": see models/relative_position.py.
  relative_max_distance: int = 128
  max_len: int = 128
  dropout_rate: float = 0.0
  mlp_hidden_dropout: bool = False  # Dropout on the MLP's hidden activations too (T5).
  init: str = "normal"
  init_scale: float = 0.02
  embed_init: str = "normal"  # normal (GPT-2) | unit (T5); see layers.EMBED_INITS.
  # GPT-2: residual-output kernels start scaled by 1/sqrt(residual branches).
  scale_residual_init: bool = True
  tie_embeddings: bool = True
  # kind="encoder": > 0 adds a classifier over the mean of the final hidden
  # states (Encoder.classify); its classes keep their own logical axis.
  num_classes: int = 0
  use_bias: bool = False  # Biases in attention and dense MLPs (GPT-2); MoE experts have none.
  fold_query_scale: bool = False  # T5: 1/sqrt(head_dim) in the query init; see LayerConfig.
  attention_impl: str = "auto"  # One of attention.ATTENTION_IMPLS.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"  # One of stack.REMAT_POLICIES.
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
        norm=self.norm, norm_eps=self.norm_eps, position=self.position,
        relative_buckets=self.relative_buckets,
        relative_max_distance=self.relative_max_distance,
        dropout_rate=self.dropout_rate, mlp_hidden_dropout=self.mlp_hidden_dropout,
        init=self.init, init_scale=self.init_scale, embed_init=self.embed_init,
        residual_init_scale=self._residual_init_scale(num_layers, cross_attention),
        use_bias=self.use_bias, fold_query_scale=self.fold_query_scale,
        attention_impl=self.attention_impl, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype))

  def _residual_init_scale(self, num_layers: int, cross_attention: bool) -> float:
    branches = num_layers * (3 if cross_attention else 2)
    return branches ** -0.5 if self.scale_residual_init and branches else 1.0


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
    if self.positions is not None and tokens.shape[1] > self.positions.max_len:
      # Rows past the table would read as NaN (jnp.take's fill), which attention
      # then spreads to every position.
      raise ValueError(f"{tokens.shape[1]} tokens exceed the model's model.max_len="
                       f"{self.positions.max_len} learned positions; cut the input to "
                       "max_len, or build the model with a larger max_len.")
    x = self.tokens(tokens)
    if self.positions is not None:
      x = x + self.positions(positions)
    return layers.dropout(x, self.dropout_rate, rng)

  def logits(self, x):
    if self.logits_kernel is None:
      # The factor that keeps initial logits O(1) for this embedding init.
      out = self.tokens.attend(x * self.tied_logits_scale)
    else:
      out = layers.dense(x, self.logits_kernel[...].astype(self.dtype), out_dtype=jnp.float32)
      out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
    return out.astype(jnp.float32)


def default_positions(tokens):
  """[1, t]: 0 .. t-1, shared by every row (relative position biases are then
  computed once, not per row)."""
  return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]


def _cache_len(cache) -> int:
  stack = cache["layers"]
  first = stack["scanned"][0] if isinstance(stack, dict) else stack[0]
  return first["self"]["k"].shape[-2]  # [(layers,) batch, kv_heads, length, head_dim]


def _cached_causal_mask(positions, cache_len: int):
  """[batch, 1, t, cache_len]: slot j is visible from position p iff j <= p."""
  slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32),
                           (positions.shape[0], cache_len))
  return attention.causal_mask(positions, slots)


def _at(x, logits_at):
  """x [b, t, ...] -> x [b, 1, ...] at per-row index logits_at [b] (None: all of x)."""
  if logits_at is None:
    return x
  return jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)


def _check_causal_router(cfg: TransformerConfig):
  router = routing.ROUTER_TABLE.get(cfg.moe.router)  # An unknown one: the MoE layer says.
  if cfg.moe_every and router is not None and router.experts_choose:
    raise ValueError(f"model.moe.router={cfg.moe.router!r} looks at future tokens; use it "
                     "in encoders only (model.kind='encoder').")


class DecoderLM(nnx.Module):
  """Decoder-only language model: causal self-attention, padded keys masked."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.embedder = _Embedder(cfg, cfg.layer_config(), rngs=rngs)
    _check_causal_router(cfg)
    self.decoder = Stack(cfg.layer_config(cfg.num_layers), cfg.num_layers,
                         cross_attention=False, causal=True, remat=cfg.remat_policy,
                         scan=cfg.scan_layers, rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def __call__(self, tokens, positions=None, rng=None):
    return self.embedder.logits(self.features(tokens, positions, rng))

  def features(self, tokens, positions=None, rng=None):
    """The final hidden states [b, t, emb] that `embedder.logits` projects."""
    positions = default_positions(tokens) if positions is None else positions
    r = layers.split_rng(rng, 2)
    x = self.embedder.embed(tokens, positions, r[0])
    valid = tokens != PAD_ID
    mask = attention.causal_mask(positions, positions) & valid[:, None, None, :]
    return self.decoder(x, mask, positions, rng=r[1], valid=valid)

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
    valid = attention.write_slots(cache["valid"], positions, tokens != PAD_ID)
    mask = _cached_causal_mask(positions, _cache_len(cache)) & valid[:, None, None, :]
    x, layer_caches = self.decoder(x, mask, positions, cache=cache["layers"],
                                   valid=tokens != PAD_ID)
    logits = self.embedder.logits(_at(x, logits_at))
    return logits, {"valid": valid, "layers": layer_caches}


class _ClassifierHead(nnx.Module):
  """The mean of the final hidden states over the real (non-padding) tokens, then
  a linear layer that starts at zero (as big_vision's heads: the first prediction
  is uniform, loss ln(classes), whatever the features' scale)."""

  def __init__(self, cfg: TransformerConfig, lcfg: layers.LayerConfig, *, rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros
    self.kernel = layers.param(rngs, zeros, (cfg.emb_dim, cfg.num_classes),
                               ("embed", "classes"), lcfg.param_dtype)
    self.bias = layers.param(rngs, zeros, (cfg.num_classes,), ("classes",), lcfg.param_dtype)

  def __call__(self, features, valid):
    """features [b, t, emb], valid [b, t] -> float32 logits [b, classes]."""
    weights = valid.astype(jnp.float32)[..., None]
    pooled = ((features.astype(jnp.float32) * weights).sum(1)
              / jnp.maximum(weights.sum(1), 1.0))
    return pooled @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Encoder(nnx.Module):
  """Bidirectional encoder (BERT-style) with a vocabulary head for masked-LM and,
  with cfg.num_classes, a classifier (`classify`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.embedder = _Embedder(cfg, cfg.layer_config(), rngs=rngs)
    self.encoder = Stack(cfg.layer_config(cfg.num_layers), cfg.num_layers,
                         cross_attention=False, causal=False, remat=cfg.remat_policy,
                         scan=cfg.scan_layers, rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every,
                         final_dropout=cfg.kind == "encdec")
    # Only the encoder itself takes the head: an encoder-decoder has its decoder.
    self.classifier = nnx.data(_ClassifierHead(cfg, cfg.layer_config(), rngs=rngs)
                               if cfg.num_classes and cfg.kind == "encoder" else None)

  def encode(self, tokens, rng=None):
    positions = default_positions(tokens)
    r = layers.split_rng(rng, 2)
    valid = tokens != PAD_ID
    x = self.embedder.embed(tokens, positions, r[0])
    return self.encoder(x, attention.padding_mask(valid, valid), positions, rng=r[1],
                        valid=valid)

  def __call__(self, tokens, rng=None):
    return self.embedder.logits(self.features(tokens, rng))

  def features(self, tokens, rng=None):
    return self.encode(tokens, rng)

  def classify(self, tokens, rng=None):
    """Class logits [b, num_classes] (float32) of each row of tokens [b, t]."""
    if self.classifier is None:
      raise ValueError("This encoder has no classifier: set model.num_classes > 0.")
    return self.classifier(self.encode(tokens, rng), tokens != PAD_ID)


class EncoderDecoder(Encoder):
  """T5-style encoder-decoder: one embedding table shared by both stacks and the output."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    _check_causal_router(cfg)
    super().__init__(cfg, rngs=rngs)
    num_decoder_layers = cfg.num_decoder_layers or cfg.num_layers
    self.decoder = Stack(cfg.layer_config(num_decoder_layers, cross_attention=True),
                         num_decoder_layers, cross_attention=True, causal=True,
                         remat=cfg.remat_policy, scan=cfg.scan_layers, rngs=rngs,
                         moe=cfg.moe, moe_every=cfg.moe_every, final_dropout=True)

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
    mask = attention.causal_mask(positions, positions)
    cross_mask = jnp.broadcast_to(enc_valid[:, None, None, :],
                                  (x.shape[0], 1, x.shape[1], encoded.shape[1]))
    return self.decoder(x, mask, positions, encoded, cross_mask, rng=r[1],
                        valid=decoder_tokens != PAD_ID)

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
                                   cache=cache["layers"], valid=decoder_tokens != PAD_ID)
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
