"""Transformer building blocks: embeddings, attention, MLP, norms.

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

from bigjax.errors import ConfigError
from bigjax.models import attention_core
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
  attention_impl: str = "auto"  # One of ATTENTION_IMPLS; see attention_impl_for.
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
# "xla": bigjax's own attention (Attention.attend), on every backend. "cudnn":
# cuDNN's fused (flash) attention through jax.nn.dot_product_attention, for
# uncached calls on a GPU. "auto": cudnn where it applies, else xla.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cuda_capability(device) -> tuple | None:
  """(major, minor) compute capability of an NVIDIA GPU, None for any other device
  (CPU, TPU, or a ROCm GPU, which JAX also calls "gpu")."""
  if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
    return None
  return tuple(int(x) for x in device.compute_capability.split("."))


def attention_impl_for(cfg: "LayerConfig", device, dropout: bool, lengths: tuple) -> str:
  """'xla' or 'cudnn' for an uncached attention call on `device` over (query, key)
  `lengths`, with or without attention dropout. cuDNN's flash attention (as JAX
  0.12 calls it) needs an NVIDIA GPU of compute capability 8.0 or newer, 16-bit
  inputs, a head dim that is a multiple of 8 up to 128 (256 from compute
  capability 9.0), even lengths (the mask is passed as a bias), and has no
  attention dropout: 'auto' picks it only then, and 'cudnn' outside it is an error
  naming what is missing."""
  dtype, capability = jnp.dtype(cfg.dtype), cuda_capability(device)
  max_head_dim = 256 if capability and capability >= (9, 0) else 128
  fits = {"an NVIDIA GPU of compute capability 8.0 or newer": bool(capability) and
                                                             capability >= (8, 0),
          "model.dtype bfloat16 or float16": dtype in (jnp.bfloat16, jnp.float16),
          f"head_dim a multiple of 8, at most {max_head_dim}":
              cfg.head_dim % 8 == 0 and cfg.head_dim <= max_head_dim,
          "even query and key lengths": all(n % 2 == 0 for n in lengths),
          "no attention dropout (model.dropout_rate=0)": not dropout}
  if cfg.attention_impl == "cudnn" and not all(fits.values()):
    missing = [need for need, ok in fits.items() if not ok]
    raise ConfigError(f"config.model.attention_impl='cudnn' needs {', '.join(missing)} (device "
                     f"{device.platform}, dtype {dtype.name}, head_dim {cfg.head_dim}, "
                     f"lengths {tuple(lengths)}); use 'auto' to fall back to bigjax's own "
                     "attention.")
  if cfg.attention_impl == "auto":
    return "cudnn" if all(fits.values()) else "xla"
  return cfg.attention_impl


def default_device():
  """The device attention_impl_for judges: the default backend's first."""
  return jax.devices()[0]


# Logical names of the attention activations [batch, length, heads, head_dim]:
# activation names have rules of their own (bigjax/sharding.py).
HEAD_ACTIVATIONS = ("activation_batch", "activation_length", "activation_heads",
                    "activation_kv")
# A self-attention cache's keys/values [batch, kv_heads, length, head_dim]: heads
# major, as attention reads them, so that no decoding step copies the whole cache
# into that layout (2x the tokens/s at batch 8; experiments/benchmarks/decode.py).
CACHE_ACTIVATIONS = ("activation_batch", "activation_heads", "activation_length",
                     "activation_kv")


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


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding on x [batch, length, heads, head_dim] (half-split form)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq  # [b, t, half]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """[batch, 1, q, k] True where key position <= query position."""
  return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def padding_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
  """[batch, 1, q, k] True where both query and key are real tokens."""
  return q_valid[:, None, :, None] & k_valid[:, None, None, :]


# A causal self-attention's queries are scored in up to this many row blocks, each
# against the keys up to its own last row only: the keys after it are masked for all
# of its rows, so their scores need not be computed. 4 blocks skip 3/8 of the score
# and softmax work; more blocks save little more and cost more, smaller matmuls.
# Blocks shorter than CAUSAL_BLOCK_ROWS cost more in slicing than they save (a
# 64-token context ran 7% slower in 4 blocks than in one on CPU).
CAUSAL_BLOCKS = 4
CAUSAL_BLOCK_ROWS = 64


def causal_block_count(length: int) -> int:
  """How many row blocks a causal self-attention over `length` tokens is scored in."""
  n = min(CAUSAL_BLOCKS, length // CAUSAL_BLOCK_ROWS)
  while n > 1 and length % n:
    n -= 1
  return max(n, 1)


class Attention(nnx.Module):
  """Multi-head attention with grouped-query heads (num_kv_heads divides num_heads).

  `causal`: the module is a causal self-attention whose mask hides every key after
  the query's own index (positions increase along each row, as the models' always
  do). Its uncached calls then skip the key blocks that the mask hides entirely
  (CAUSAL_BLOCKS); the result is the same.
  """

  def __init__(self, cfg: LayerConfig, *, rotary_positions: bool, rngs: nnx.Rngs,
               causal: bool = False):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must be a multiple of "
                       f"model.num_kv_heads={cfg.num_kv_heads}.")
    self.cfg, self.rotary, self.causal = cfg, rotary_positions, causal
    e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv_init = kernel_init(cfg, in_axis=0, out_axis=(1, 2))
    query_init = scaled(qkv_init, d ** -0.5) if cfg.fold_query_scale else qkv_init
    self.query = param(rngs, query_init, (e, h, d), ("embed", "heads", "kv"), cfg.param_dtype)
    self.key = param(rngs, qkv_init, (e, k, d), ("embed", "heads", "kv"), cfg.param_dtype)
    self.value = param(rngs, qkv_init, (e, k, d), ("embed", "heads", "kv"), cfg.param_dtype)
    self.out = param(rngs, residual_init(cfg, in_axis=(0, 1), out_axis=2), (h, d, e),
                     ("heads", "kv", "embed"), cfg.param_dtype)
    self.query_bias = bias(cfg, (h, d), ("heads", "kv"))
    self.key_bias = bias(cfg, (k, d), ("heads", "kv"))
    self.value_bias = bias(cfg, (k, d), ("heads", "kv"))
    self.out_bias = bias(cfg, (e,), ("embed",))

  def __call__(self, x_q, x_kv, mask, q_positions=None, k_positions=None, rng=None,
               cache=None, bias=None):
    """Attention of x_q [b, t, e] over x_kv [b, s, e]; mask [b, 1, t, s]; bias None
    or (table [buckets, heads], ids [b or 1, t, s]): scores + table[ids]
    (relative_position.py).

    With `cache` ({"k", "v"}: [b, kv_heads, cache_len, head_dim]), this is cached
    self-attention: the keys and values of x_q are written into the cache at slots
    `q_positions` [b, t] (a row's slot is its position), then x_q attends over the
    whole cache, mask [b, 1, t, cache_len]; x_kv and k_positions are ignored and
    (output, updated cache) is returned.
    """
    if cache is not None:
      return self.cached_self_attention(x_q, mask, q_positions, cache, rng, bias)
    q = self.project_query(x_q, q_positions)
    k, v = self.project_kv(x_kv, k_positions)
    return self.attend(q, k, v, mask, rng, uncached=True, bias=bias)

  def project_query(self, x_q, q_positions=None):
    q = add_bias(dense(x_q, self.query[...].astype(self.cfg.dtype)), self.query_bias)
    q = constrain(q, HEAD_ACTIVATIONS)
    return rotary(q, q_positions) if self.rotary else q

  def project_kv(self, x_kv, k_positions=None):
    """Keys and values [b, s, kv_heads, head_dim] (rotary applied to the keys)."""
    dt = self.cfg.dtype
    k = add_bias(dense(x_kv, self.key[...].astype(dt)), self.key_bias)
    v = add_bias(dense(x_kv, self.value[...].astype(dt)), self.value_bias)
    k = constrain(k, HEAD_ACTIVATIONS)
    v = constrain(v, HEAD_ACTIVATIONS)
    if self.rotary:
      k = rotary(k, k_positions)
    return k, v

  def attend(self, q, k, v, mask, rng=None, uncached=False, bias=None, kv_heads_major=False):
    """Projected queries [b, t, h, d] over keys/values [b, s, kv_heads, d] (with
    kv_heads_major, a cache's [b, kv_heads, s, d]) -> [b, t, e].

    `uncached`: whole sequences, not a KV cache. A causal module's queries are
    then scored in causal_block_count(t) row blocks, each over the keys up to its
    last row, and attention_impl_for may choose cuDNN's fused attention (not with
    a `bias`, whose gradient bigjax's own attention computes).
    """
    cfg = self.cfg
    b, t, h, d = q.shape
    kv, s = cfg.num_kv_heads, k.shape[2 if kv_heads_major else 1]
    causal = self.causal and uncached and t == s
    dropout = cfg.dropout_rate > 0 and rng is not None
    if (uncached and bias is None
        and attention_impl_for(cfg, default_device(), dropout, (t, s)) == "cudnn"):
      # The mask is passed as well: it may hide padding besides the future keys.
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                         scale=1.0 if cfg.fold_query_scale else None,
                                         implementation="cudnn")
      return self._project_out(out)
    # Heads major ([b, kv, g, t, d], [b, kv, s, d]): each head's scores and values are
    # then plain row-major batched matmuls; over the [b, t, h, d] layout XLA:CPU
    # runs attention's forward and backward passes about 1.3x slower.
    if not cfg.fold_query_scale:
      q = q * d ** -0.5
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    if not kv_heads_major:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if bias is not None:
      table, ids = bias
      bias = (table.reshape(table.shape[0], kv, h // kv), ids)
    out = attention_core.attention(q, k, v, mask, blocks=causal_block_count(t) if causal else 1,
                                   dropout_rate=cfg.dropout_rate, rng=rng, bias=bias)
    return self._project_out(out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d))

  def _project_out(self, out):
    """The heads' outputs [b, t, h, d] -> [b, t, e]."""
    out = constrain(out, HEAD_ACTIVATIONS)
    y = add_bias(dense(out, self.out[...].astype(self.cfg.dtype), contract=2), self.out_bias)
    return constrain(y, ("activation_batch", "activation_length", "activation_embed"))

  def cached_self_attention(self, x, mask, positions, cache, rng=None, bias=None):
    q = self.project_query(x, positions)
    k, v = self.project_kv(x, positions)
    new = {name: constrain(write_slots(cache[name], positions, val.astype(cache[name].dtype),
                                       axis=1), CACHE_ACTIVATIONS)
           for name, val in (("k", k), ("v", v))}
    return self.attend(q, new["k"], new["v"], mask, rng, bias=bias, kv_heads_major=True), new

  def init_cache(self, batch: int, length: int) -> dict:
    """An empty self-attention cache: {"k", "v"} zeros [batch, kv_heads, length, head_dim]."""
    shape = (batch, self.cfg.num_kv_heads, length, self.cfg.head_dim)
    return {name: constrain(jnp.zeros(shape, self.cfg.dtype),
                            CACHE_ACTIVATIONS) for name in ("k", "v")}


def write_slots(cache, positions, values, axis: int = 0):
  """cache [b, s, ...] with row r's values [b, t, ...] written at its slots
  positions [b or 1, t] (a shared [1, t] row is broadcast). Slots past the cache
  (>= s) are dropped. axis=1: a heads-major cache [b, kv, s, d] takes values
  [b, t, kv, d] along its length axis (scattered in place, no layout copy).

  A scatter per row (vmapped), so that its batch dimension is a scatter batch
  dimension: GSPMD keeps a batch-sharded cache's writes on each row's own device.
  One scatter indexed by (row, slot) pairs it cannot prove row-local, and gathers
  every device's values and indices to every device (the whole batch's prompt
  keys/values at prefill)."""
  positions = jnp.broadcast_to(positions, values.shape[:2])
  if axis == 1:
    return jax.vmap(lambda c, p, v: c.at[:, p].set(v.swapaxes(0, 1)))(cache, positions, values)
  return jax.vmap(lambda c, p, v: c.at[p].set(v))(cache, positions, values)


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
