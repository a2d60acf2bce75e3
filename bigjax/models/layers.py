"""Transformer building blocks: embeddings, MLP, norms, and the configuration,
initialisers and helpers (dense, param, bias, dropout) that attention.py's
attention layer shares.

Every parameter carries logical axis names (`out_sharding` metadata) and key
activations are constrained by logical name through `bigjax.sharding`.
Compute runs in `dtype`; parameters are stored in `param_dtype`; softmax,
norms and logits are computed in float32.
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.sharding import constrain

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "gelu"
  gated_mlp: bool = False
  norm: str = "layernorm"
  norm_eps: float = 1e-6  # Added to the variance (GPT-2: 1e-5; T5: 1e-6).
  position: str = "learned"  # learned | rotary | relative
  # position="relative": T5's buckets of key-query offsets (relative_position.py).
  relative_buckets: int = 32
  relative_max_distance: int = 128
  dropout_rate: float = 0.0
  # Whether the dense MLP drops out its hidden activations (at dropout_rate): T5's
  # and T5X's MLP blocks do; GPT-2's, BERT's and Llama's do not (HF's GPT2MLP and
  # BertIntermediate drop out only the block's output, as every residual branch).
  mlp_hidden_dropout: bool = False
  init: str = "normal"
  init_scale: float = 0.02
  # Token and position embeddings: "normal" draws N(0, init_scale^2) (GPT-2),
  # "unit" N(0, 1) (T5, PaLM). Tied output logits follow it; see EMBED_INITS.
  embed_init: str = "normal"
  # Multiplies the init of kernels that write into the residual stream (attention
  # and MLP outputs): GPT-2 uses 1/sqrt(residual branches) so the stream's
  # variance at init does not grow with depth.
  residual_init_scale: float = 1.0
  # Biases on the attention projections and the MLP's matmuls, zero at init (GPT-2,
  # BERT have them; T5, PaLM, Llama do not).
  use_bias: bool = False
  # The scores' 1/sqrt(head_dim): False multiplies the queries by it in every call
  # (GPT-2, Llama); True folds it into the query kernel's initialisation instead
  # (T5, T5X): the same function at init, but Adam then moves the query kernel at
  # head_dim**-0.5 of the other side's relative rate, so training differs.
  fold_query_scale: bool = False
  # One of attention.ATTENTION_IMPLS; see attention.attention_impl_for.
  attention_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")  # Compute.
PARAM_DTYPES = ("float32", "bfloat16")  # Storage.
INITS = ("normal", "xavier", "lecun")
# Embedding init -> factor on tied logits (x . E^T) that keeps them O(1) at init:
# a unit-variance table needs emb_dim ** -0.5 (T5, PaLM); a table of std 0.02
# (GPT-2) is used as it is, since its logits already have std 0.02 * sqrt(emb_dim).
EMBED_INITS = ("normal", "unit")


def cuda_capability(device) -> tuple | None:
  """(major, minor) compute capability of an NVIDIA GPU, None for any other device
  (CPU, TPU, or a ROCm GPU, which JAX also calls "gpu")."""
  if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
    return None
  return tuple(int(x) for x in device.compute_capability.split("."))


def default_device():
  """The device that attention.attention_impl_for and moe's implementation choices
  judge: the default backend's first."""
  return jax.devices()[0]


def kernel_init(cfg: LayerConfig, in_axis=-2, out_axis=-1, batch_axis=()) -> Initializer:
  """Initialiser by name; in/out axes say which dimensions are fan-in/fan-out, and
  batch axes index independent kernels (experts), which count in neither: an axis
  in none of the three would multiply the fans as a receptive field does."""
  if cfg.init == "normal":
    return nnx.initializers.normal(cfg.init_scale)
  if cfg.init == "xavier":
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis,
                                             batch_axis)
  if cfg.init == "lecun":
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis,
                                             out_axis, batch_axis)
  raise ValueError(f"model.init={cfg.init!r}; choose one of {INITS}.")


def embed_init(cfg: LayerConfig) -> Initializer:
  if cfg.embed_init not in EMBED_INITS:
    raise ValueError(f"model.embed_init={cfg.embed_init!r}; choose one of {EMBED_INITS}.")
  return nnx.initializers.normal(cfg.init_scale if cfg.embed_init == "normal" else 1.0)


def tied_logits_scale(cfg: LayerConfig) -> float:
  return cfg.emb_dim ** -0.5 if cfg.embed_init == "unit" else 1.0


def scaled(init: Initializer, factor: float) -> Initializer:
  if factor == 1.0:
    return init
  return lambda key, shape, dtype=jnp.float32: (init(key, shape, dtype) * factor).astype(dtype)


def residual_init(cfg: LayerConfig, in_axis=-2, out_axis=-1, batch_axis=()) -> Initializer:
  """kernel_init scaled by cfg.residual_init_scale (for outputs added to the stream)."""
  return scaled(kernel_init(cfg, in_axis, out_axis, batch_axis), cfg.residual_init_scale)


def dense(x: jax.Array, kernel: jax.Array, contract: int = 1,
          out_dtype: jnp.dtype | None = None) -> jax.Array:
  """x [..., *k] times kernel [*k, *n] -> [..., *n], contracting the last
  `contract` dims of x with the first of the kernel, as one 2-D matmul whose
  result is out_dtype (default: the operands'; the logits ask for float32 so that
  bf16 compute does not round them before the softmax).

  Why not einsum("bte,em->btm"): XLA:CPU gives the backward pass of the rank-3
  form transposed copies of the activations (written inside the elementwise
  fusions before each weight-gradient matmul); over [b*t, features] every
  forward and backward matmul is a plain row-major one. Same mathematics, same
  shardings (the batch dimension stays major); experiments/benchmarks/peer.py
  measures the difference.
  """
  lead = x.shape[:x.ndim - contract]
  k = math.prod(kernel.shape[:contract])
  y = jnp.dot(x.reshape(-1, k), kernel.reshape(k, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *kernel.shape[contract:])


def param(rngs: nnx.Rngs, init: Initializer, shape, names, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def bias(cfg: LayerConfig, shape, names):
  """A zero-initialised bias of `shape`, or None without cfg.use_bias."""
  return nnx.data(nnx.Param(jnp.zeros(shape, cfg.param_dtype), out_sharding=names)
                  if cfg.use_bias else None)


def add_bias(y: jax.Array, b: nnx.Param | None) -> jax.Array:
  return y if b is None else y + b[...].astype(y.dtype)


def split_rng(rng: jax.Array | None, n: int) -> list:
  """n keys from `rng`, or n Nones in evaluation mode (rng None)."""
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout with an explicit key; identity when rng is None."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32."""

  def __init__(self, cfg: LayerConfig, *, rngs: nnx.Rngs):
    if cfg.norm not in NORMS:
      raise ValueError(f"model.norm={cfg.norm!r}; choose one of {NORMS}.")
    self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, cfg.dtype
    self.scale = nnx.Param(jnp.ones((cfg.emb_dim,), cfg.param_dtype), out_sharding=("embed",))
    self.bias = nnx.data(
        nnx.Param(jnp.zeros((cfg.emb_dim,), cfg.param_dtype), out_sharding=("embed",))
        if cfg.norm == "layernorm" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    y = normalize(x.astype(jnp.float32), self.scale[...], bias, self.eps,
                  self.kind == "layernorm")
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, eps: float, center: bool):
  """(x - mean(x) if center) / rms * scale + bias over the last axis (bias may be None).

  The backward pass is written out (the standard closed form: two row means of
  the scaled output gradient); autodiff's took ~2% longer in the GPT-2 speed step
  on CPU. tests/test_layers.py holds it to autodiff of the plain formula."""
  return _normalize_forward(x, scale, bias, eps, center)[0]


def _normalize_forward(x, scale, bias, eps, center):
  centered = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
  x_hat = centered * inv_rms
  y = x_hat * scale if bias is None else x_hat * scale + bias
  return y, (x, inv_rms, scale, bias)


def _normalize_backward(eps, center, residuals, d_y):
  x, inv_rms, scale, bias = residuals
  x_hat = (x - jnp.mean(x, axis=-1, keepdims=True) if center else x) * inv_rms
  d_hat = d_y * scale
  d_x = d_hat - x_hat * jnp.mean(d_hat * x_hat, axis=-1, keepdims=True)
  if center:
    d_x = d_x - jnp.mean(d_hat, axis=-1, keepdims=True)
  rows = tuple(range(d_y.ndim - 1))
  return (d_x * inv_rms, jnp.sum(d_y * x_hat, axis=rows).astype(scale.dtype),
          jnp.sum(d_y, axis=rows).astype(bias.dtype) if bias is not None else None)


normalize.defvjp(_normalize_forward, _normalize_backward)


class Embed(nnx.Module):
  """Token embedding table; `attend` reuses it as the output projection."""

  def __init__(self, vocab_size: int, cfg: LayerConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.embedding = param(rngs, embed_init(cfg), (vocab_size, cfg.emb_dim), ("vocab", "embed"),
                           cfg.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # The lookup reads the table with its embed dimension gathered (FSDP's weight
    # gather). Looked up split, on an fsdp x tensor mesh the backward pass moved fsdp
    # from the embed to the batch dimension by gathering the whole [batch, length,
    # emb] activation on every device.
    table = constrain(self.embedding[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def attend(self, x: jax.Array) -> jax.Array:
    logits = dense(x, self.embedding[...].astype(self.dtype).T, out_dtype=jnp.float32)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


class PositionEmbed(nnx.Module):
  """Learned absolute position embeddings."""

  def __init__(self, max_len: int, cfg: LayerConfig, *, rngs: nnx.Rngs):
    self.max_len, self.dtype = max_len, cfg.dtype
    self.embedding = param(rngs, embed_init(cfg), (max_len, cfg.emb_dim), (None, "embed"),
                           cfg.param_dtype)

  def __call__(self, positions: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)


class MLP(nnx.Module):
  """Plain (act(x W_i) W_o) or gated (act(x W_g) * x W_i) W_o feed-forward block."""

  def __init__(self, cfg: LayerConfig, *, rngs: nnx.Rngs):
    if cfg.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model.mlp_activation={cfg.mlp_activation!r}; "
                       f"choose one of {sorted(ACTIVATIONS)}.")
    self.cfg = cfg
    init = kernel_init(cfg)
    shape_in, shape_out = (cfg.emb_dim, cfg.mlp_dim), (cfg.mlp_dim, cfg.emb_dim)
    self.wi = param(rngs, init, shape_in, ("embed", "mlp"), cfg.param_dtype)
    self.wi_gate = nnx.data(param(rngs, init, shape_in, ("embed", "mlp"), cfg.param_dtype)
                            if cfg.gated_mlp else None)
    self.wo = param(rngs, residual_init(cfg), shape_out, ("mlp", "embed"), cfg.param_dtype)
    self.wi_bias = bias(cfg, (cfg.mlp_dim,), ("mlp",))
    self.wi_gate_bias = bias(cfg, (cfg.mlp_dim,), ("mlp",)) if cfg.gated_mlp else nnx.data(None)
    self.wo_bias = bias(cfg, (cfg.emb_dim,), ("embed",))

  def __call__(self, x: jax.Array, rng=None) -> jax.Array:
    dt, act = self.cfg.dtype, ACTIVATIONS[self.cfg.mlp_activation]
    h = add_bias(dense(x, self.wi[...].astype(dt)), self.wi_bias)
    if self.wi_gate is not None:
      h = act(add_bias(dense(x, self.wi_gate[...].astype(dt)), self.wi_gate_bias)) * h
    else:
      h = act(h)
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    if self.cfg.mlp_hidden_dropout:
      h = dropout(h, self.cfg.dropout_rate, rng)
    y = add_bias(dense(h, self.wo[...].astype(dt)), self.wo_bias)
    return constrain(y, ("activation_batch", "activation_length", "activation_embed"))
