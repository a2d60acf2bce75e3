"""The key/value cache: its creation, the prompt prefill and one decode step.

- Functional. The cache is a pytree of arrays passed in and returned
  (`init_cache`, `decode_step`); the model is `nnx.merge`d from (graphdef, state)
  inside the traced function, so the whole generation (prefill + loop) is one
  `jax.jit` around a `lax.while_loop`, with the cache in the loop carry.
- Fixed shapes. Each self-attention layer holds {"k", "v"} of shape
  [batch, kv_heads, cache_len, head_dim] with cache_len = the prompts' padded
  width + the new tokens' buffer (bigjax.decode_batch buckets both, so that one
  compilation serves many calls, within a learned position table's length or
  the max_len it is given).
- Batched prompts of different lengths: right padding with per-row positions.
  Every row starts at position 0, exactly as in training, and a token's cache slot
  is its position. The prefill runs the padded [batch, width] block at once and
  takes each row's logits at its own last prompt token; from then on row r feeds
  its token at position len_r + i, so rows sit at different positions in the same
  step (learned, rotary and relative positions are all per-row; the prefill's
  positions are one shared row, as in training). Slots past a row's
  position (the prefill's padding, not yet overwritten) are hidden by causality.
  Left padding would need the pad keys masked at every step and shifted
  positions; right padding needs neither.
- Encoder-decoder: the prompt is the encoder input; the decoder starts from BOS at
  position 0. The encoder runs once; each decoder layer's cross-attention keys
  and values are computed once into the cache.
"""
import jax.numpy as jnp
from flax import nnx

from bigjax.data.tokenizer import BOS_ID
from bigjax.models.transformer import DecoderLM, EncoderDecoder


def is_encdec(model) -> bool:
  if isinstance(model, EncoderDecoder):
    return True
  if isinstance(model, DecoderLM):
    return False
  raise ValueError(f"Cannot generate with a {type(model).__name__}: decoding needs a "
                   "decoder-only (model.kind='decoder') or encoder-decoder "
                   "(model.kind='encdec') model.")


def init_cache(graphdef, state, batch: int, cache_len: int, encoder_tokens=None):
  """An empty cache for `cache_len` decoder positions. Encoder-decoder models
  encode `encoder_tokens` [batch, enc_len] here and cache the cross-attention
  keys/values."""
  model = nnx.merge(graphdef, state)
  if isinstance(model, EncoderDecoder):
    return model.init_cache(model.encode(encoder_tokens), encoder_tokens, cache_len)
  return model.init_cache(batch, cache_len)


def decode_step(graphdef, state, cache, tokens, positions, logits_at=None):
  """Runs tokens [b, t] at positions [b, t] (also their cache slots) on top of the
  cache: (float32 logits [b, t, vocab] (or [b, 1, vocab] at the per-row index
  logits_at [b]), updated cache). Pure; jit it with graphdef static."""
  return nnx.merge(graphdef, state).extend(tokens, positions, cache, logits_at=logits_at)


def prefill(graphdef, state, prompts, lengths, cache_len: int):
  """Fills a fresh cache from the prompts. Returns (logits [b, vocab] for each
  row's first new token, the cache, start [b]: the position of that new token).

  Decoder-only: prompts [b, L] right-padded, lengths [b]. Encoder-decoder: the
  prompts are the encoder input and the decoder starts from BOS at position 0.
  """
  b, length = prompts.shape
  if is_encdec(nnx.merge(graphdef, state)):
    cache = init_cache(graphdef, state, b, cache_len, encoder_tokens=prompts)
    bos = jnp.full((b, 1), BOS_ID, jnp.int32)
    logits, cache = decode_step(graphdef, state, cache, bos, jnp.zeros((b, 1), jnp.int32))
    return logits[:, 0], cache, jnp.ones((b,), jnp.int32)
  cache = init_cache(graphdef, state, b, cache_len)
  positions = jnp.arange(length, dtype=jnp.int32)[None]  # Every row's: [1, L].
  logits, cache = decode_step(graphdef, state, cache, prompts, positions,
                              logits_at=lengths - 1)
  return logits[:, 0], cache, lengths.astype(jnp.int32)
