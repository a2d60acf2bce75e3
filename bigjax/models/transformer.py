"""Transformer stacks: a decoder-only LM, an encoder, and a T5-style encoder-decoder.

All share pre-norm residual blocks built from `layers`. Token id 0 is padding:
padded keys are masked out of attention. Logits are returned in float32.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import layers, moe as moe_lib
from bigjax.sharding import constrain

PAD_ID = 0
KINDS = ("decoder", "encoder", "encdec")
POSITIONS = ("learned", "rotary")


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
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  moe_every: int = 0  # 0: dense. k: every k-th block's MLP is a MoE layer.
  moe: moe_lib.MoEConfig = moe_lib.MoEConfig()

  @classmethod
  def from_dict(cls, d) -> "TransformerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(d).items() if k in fields}
    if "moe" in kwargs and not isinstance(kwargs["moe"], moe_lib.MoEConfig):
      kwargs["moe"] = moe_lib.MoEConfig.from_dict(kwargs["moe"])
    return cls(**kwargs)

  def layer_config(self) -> layers.LayerConfig:
    if self.position not in POSITIONS:
      raise ValueError(f"model.position={self.position!r}; choose one of {POSITIONS}.")
    return layers.LayerConfig(
        emb_dim=self.emb_dim, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads or self.num_heads,
        head_dim=self.head_dim or self.emb_dim // self.num_heads,
        mlp_dim=self.mlp_dim, mlp_activation=self.mlp_activation, gated_mlp=self.gated_mlp,
        norm=self.norm, position=self.position, dropout_rate=self.dropout_rate,
        init=self.init, init_scale=self.init_scale, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype))


def _split(rng, n):
  return [None] * n if rng is None else list(jax.random.split(rng, n))


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

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None):
    r = _split(rng, 6)
    h = self.attn_norm(x)
    h = self.attn(h, h, mask, positions, positions, rng=r[0])
    x = x + layers.dropout(h, self.dropout_rate, r[1])
    if self.cross is not None:
      h = self.cross(self.cross_norm(x), encoded, cross_mask, rng=r[2])
      x = x + layers.dropout(h, self.dropout_rate, r[3])
    h = self.ffn(self.ffn_norm(x), rng=r[4])
    x = x + layers.dropout(h, self.dropout_rate, r[5])
    return constrain(x, ("batch", "length", "embed"))


class Stack(nnx.Module):
  """num_layers blocks and a final norm; optionally rematerialised per block."""

  def __init__(self, cfg: layers.LayerConfig, num_layers: int, *, cross_attention: bool,
               remat: bool, rngs: nnx.Rngs, moe: moe_lib.MoEConfig | None = None,
               moe_every: int = 0):
    # GShard places MoE in every other block: with moe_every=2, blocks 1, 3, ...
    self.blocks = nnx.List([
        Block(cfg, cross_attention=cross_attention, rngs=rngs,
              moe=moe if moe_every and (i + 1) % moe_every == 0 else None)
        for i in range(num_layers)])
    self.final_norm = layers.Norm(cfg, rngs=rngs)
    self.remat = remat

  def __call__(self, x, mask, positions, encoded=None, cross_mask=None, rng=None):
    for block, r in zip(self.blocks, _split(rng, len(self.blocks))):
      if self.remat:
        x = nnx.remat(lambda b, *a: b(*a))(block, x, mask, positions, encoded, cross_mask, r)
      else:
        x = block(x, mask, positions, encoded, cross_mask, r)
    return self.final_norm(x)


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

  def embed(self, tokens, positions, rng=None):
    x = self.tokens(tokens)
    if self.positions is not None:
      x = x + self.positions(positions)
    return layers.dropout(x, self.dropout_rate, rng)

  def logits(self, x):
    if self.logits_kernel is None:
      # Tied embeddings: scale so initial logits stay O(1) whatever the width.
      out = self.tokens.attend(x * (x.shape[-1] ** -0.5))
    else:
      out = jnp.einsum("bte,ev->btv", x, self.logits_kernel[...].astype(self.dtype))
      out = constrain(out, ("batch", "length", "vocab"))
    return out.astype(jnp.float32)


def default_positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _check_causal_router(cfg: TransformerConfig):
  if cfg.moe_every and cfg.moe.router == "expert_choice":
    raise ValueError("model.moe.router='expert_choice' looks at future tokens; use it "
                     "in encoders only (model.kind='encoder').")


class DecoderLM(nnx.Module):
  """Decoder-only language model: causal self-attention, padded keys masked."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    lcfg = cfg.layer_config()
    self.embedder = _Embedder(cfg, lcfg, rngs=rngs)
    _check_causal_router(cfg)
    self.decoder = Stack(lcfg, cfg.num_layers, cross_attention=False, remat=cfg.remat,
                         rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def __call__(self, tokens, positions=None, rng=None):
    positions = default_positions(tokens) if positions is None else positions
    r = _split(rng, 2)
    x = self.embedder.embed(tokens, positions, r[0])
    mask = layers.causal_mask(positions, positions) & (tokens != PAD_ID)[:, None, None, :]
    x = self.decoder(x, mask, positions, rng=r[1])
    return self.embedder.logits(x)


class Encoder(nnx.Module):
  """Bidirectional encoder (BERT-style) with a vocabulary head for masked-LM."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    lcfg = cfg.layer_config()
    self.embedder = _Embedder(cfg, lcfg, rngs=rngs)
    self.encoder = Stack(lcfg, cfg.num_layers, cross_attention=False, remat=cfg.remat,
                         rngs=rngs, moe=cfg.moe, moe_every=cfg.moe_every)

  def encode(self, tokens, rng=None):
    positions = default_positions(tokens)
    r = _split(rng, 2)
    valid = tokens != PAD_ID
    x = self.embedder.embed(tokens, positions, r[0])
    return self.encoder(x, layers.padding_mask(valid, valid), positions, rng=r[1])

  def __call__(self, tokens, rng=None):
    return self.embedder.logits(self.encode(tokens, rng))


class EncoderDecoder(Encoder):
  """T5-style encoder-decoder: one embedding table shared by both stacks and the output."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    _check_causal_router(cfg)
    super().__init__(cfg, rngs=rngs)
    self.decoder = Stack(cfg.layer_config(), cfg.num_decoder_layers or cfg.num_layers,
                         cross_attention=True, remat=cfg.remat, rngs=rngs, moe=cfg.moe,
                         moe_every=cfg.moe_every)

  def decode(self, encoded, encoder_tokens, decoder_tokens, positions=None, rng=None):
    positions = default_positions(decoder_tokens) if positions is None else positions
    r = _split(rng, 2)
    x = self.embedder.embed(decoder_tokens, positions, r[0])
    enc_valid = encoder_tokens != PAD_ID
    # Decoder inputs start with BOS, which is never padding: keys are masked by
    # causality alone, so shifted targets may end with padding safely.
    mask = layers.causal_mask(positions, positions)
    cross_mask = jnp.broadcast_to(enc_valid[:, None, None, :],
                                  (x.shape[0], 1, x.shape[1], encoded.shape[1]))
    x = self.decoder(x, mask, positions, encoded, cross_mask, rng=r[1])
    return self.embedder.logits(x)

  def __call__(self, encoder_tokens, decoder_tokens, rng=None):
    r = _split(rng, 2)
    encoded = self.encode(encoder_tokens, r[0])
    return self.decode(encoded, encoder_tokens, decoder_tokens, rng=r[1])


def build(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.kind == "decoder":
    return DecoderLM(cfg, rngs=rngs)
  if cfg.kind == "encoder":
    return Encoder(cfg, rngs=rngs)
  if cfg.kind == "encdec":
    return EncoderDecoder(cfg, rngs=rngs)
  raise ValueError(f"model.kind={cfg.kind!r}; choose one of {KINDS}.")
