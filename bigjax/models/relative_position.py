"""T5's relative position biases (model.position="relative").

Each head learns one scalar per bucket of a key's offset from its query, added to
the attention scores; there are no position embeddings. Offsets shorter than half
the buckets (per direction) have a bucket each; longer ones share buckets whose
width grows logarithmically up to `max_distance`, beyond which all offsets share
the last bucket. An encoder's buckets are split between keys before and after the
query; a causal stack sees only keys at or before it, so all its buckets go to
those. One table per stack, shared by its blocks' self-attention (T5 keeps it in
the first block and hands the biases on); cross-attention has none.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import layers


def bucket(offset: jax.Array, *, bidirectional: bool, num_buckets: int,
           max_distance: int) -> jax.Array:
  """Bucket ids in [0, num_buckets) of `offset` = key position - query position."""
  if bidirectional:
    num_buckets //= 2
    first = jnp.where(offset > 0, num_buckets, 0)
    distance = jnp.abs(offset)
  else:
    first, distance = 0, jnp.maximum(-offset, 0)
  exact = num_buckets // 2
  # Distances from `exact` to max_distance spread over the other buckets by their
  # logarithm (in float32, truncated, as T5 computes it, so that T5 weights map).
  # maximum(.., 1): the logarithm of 0 is never used, but would be computed.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
            / math.log(max_distance / exact) * (num_buckets - exact))
  far = jnp.minimum(exact + scaled.astype(jnp.int32), num_buckets - 1)
  return first + jnp.where(distance < exact, distance, far)


class RelativePositionBias(nnx.Module):
  """The biases of queries at q_positions [B, t] over keys at k_positions [B, s]
  (B = 1 when every row has the same positions), as (table [buckets, heads],
  bucket ids [B, t, s]): attention adds table[ids] to its scores block by block
  and reduces the gradient into the table (attention_core.attention)."""

  def __init__(self, cfg: layers.LayerConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    self.bidirectional = bidirectional
    self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
    self.table = layers.param(rngs, layers.kernel_init(cfg, in_axis=0, out_axis=1),
                              (self.num_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                              cfg.param_dtype)

  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> tuple:
    ids = bucket(k_positions[:, None, :] - q_positions[:, :, None],
                 bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                 max_distance=self.max_distance)
    return self.table[...], ids
