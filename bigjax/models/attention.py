"""Multi-head self- and cross-attention: the Attention layer (grouped-query heads,
causal row blocks, a heads-major KV cache), its choice of implementation
(bigjax's own or cuDNN's fused attention), rotary positions, the causal and
padding masks, and write_slots, which writes into the decoding caches.

The score/softmax/value core it runs is attention_core.py's; the configuration,
initialisers and projections it shares with the other blocks are layers.py's.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.errors import ConfigError
from bigjax.models import attention_core, layers
from bigjax.sharding import constrain

# "xla": bigjax's own attention (Attention.attend), on every backend. "cudnn":
# cuDNN's fused (flash) attention through jax.nn.dot_product_attention, for
# uncached calls on a GPU. "auto": cudnn where it applies, else xla.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def attention_impl_for(cfg: layers.LayerConfig, device, dropout: bool, lengths: tuple) -> str:
  """'xla' or 'cudnn' for an uncached attention call on `device` over (query, key)
  `lengths`, with or without attention dropout. cuDNN's flash attention (as JAX
  0.12 calls it) needs an NVIDIA GPU of compute capability 8.0 or newer, 16-bit
  inputs, a head dim that is a multiple of 8 up to 128 (256 from compute
  capability 9.0), even lengths (the mask is passed as a bias), and has no
  attention dropout: 'auto' picks it only then, and 'cudnn' outside it is an error
  naming what is missing."""
  dtype, capability = jnp.dtype(cfg.dtype), layers.cuda_capability(device)
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


# Logical names of the attention activations [batch, length, heads, head_dim]:
# activation names have rules of their own (bigjax/sharding.py).
HEAD_ACTIVATIONS = ("activation_batch", "activation_length", "activation_heads",
                    "activation_kv")
# A self-attention cache's keys/values [batch, kv_heads, length, head_dim]: heads
# major, as attention reads them, so that no decoding step copies the whole cache
# into that layout (2x the tokens/s at batch 8; experiments/benchmarks/decode.py).
CACHE_ACTIVATIONS = ("activation_batch", "activation_heads", "activation_length",
                     "activation_kv")


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

  def __init__(self, cfg: layers.LayerConfig, *, rotary_positions: bool, rngs: nnx.Rngs,
               causal: bool = False):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must be a multiple of "
                       f"model.num_kv_heads={cfg.num_kv_heads}.")
    self.cfg, self.rotary, self.causal = cfg, rotary_positions, causal
    e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv_init = layers.kernel_init(cfg, in_axis=0, out_axis=(1, 2))
    query_init = layers.scaled(qkv_init, d ** -0.5) if cfg.fold_query_scale else qkv_init
    names, pdt = ("embed", "heads", "kv"), cfg.param_dtype
    self.query = layers.param(rngs, query_init, (e, h, d), names, pdt)
    self.key = layers.param(rngs, qkv_init, (e, k, d), names, pdt)
    self.value = layers.param(rngs, qkv_init, (e, k, d), names, pdt)
    self.out = layers.param(rngs, layers.residual_init(cfg, in_axis=(0, 1), out_axis=2),
                            (h, d, e), ("heads", "kv", "embed"), pdt)
    self.query_bias = layers.bias(cfg, (h, d), ("heads", "kv"))
    self.key_bias = layers.bias(cfg, (k, d), ("heads", "kv"))
    self.value_bias = layers.bias(cfg, (k, d), ("heads", "kv"))
    self.out_bias = layers.bias(cfg, (e,), ("embed",))

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
    q = layers.add_bias(layers.dense(x_q, self.query[...].astype(self.cfg.dtype)),
                        self.query_bias)
    q = constrain(q, HEAD_ACTIVATIONS)
    return rotary(q, q_positions) if self.rotary else q

  def project_kv(self, x_kv, k_positions=None):
    """Keys and values [b, s, kv_heads, head_dim] (rotary applied to the keys)."""
    dt = self.cfg.dtype
    k = layers.add_bias(layers.dense(x_kv, self.key[...].astype(dt)), self.key_bias)
    v = layers.add_bias(layers.dense(x_kv, self.value[...].astype(dt)), self.value_bias)
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
        and attention_impl_for(cfg, layers.default_device(), dropout, (t, s)) == "cudnn"):
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
    y = layers.add_bias(layers.dense(out, self.out[...].astype(self.cfg.dtype), contract=2),
                        self.out_bias)
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
