"""Beam search with a key/value cache, for decoder-only and encoder-decoder models
(dense or MoE); `bigjax.decode.generate(beam_size > 1)` calls it.

- Beam search (`beam_search`): 2K candidates per step so that K beams stay alive
  after EOS hypotheses are set aside; an EOS candidate ranked among the K best
  becomes a finished hypothesis (so beam_size 1 is greedy search), scoring
  log p / ((5 + n) / 6) ** length_penalty for n new tokens, EOS included (GNMT);
  a row stops once its best live beam cannot beat its worst finished one, and
  returns its best finished hypothesis (or live beam, if cut by the length limit).

The prompts are bucketed into fixed-shape batches and sharded over a mesh as for
sampling (`bigjax.decode_batch`); the cache, eos_id and MoE routing are as in
`bigjax.decode` (see its docstring).
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import decode_batch, sharding
from bigjax.data.tokenizer import EOS_ID
from bigjax.kv_cache import decode_step, prefill
from bigjax.models.transformer import PAD_ID

# Beam search's default brevity exponent (GNMT's length normalisation), as T5X's.
LENGTH_PENALTY = 0.6


def _brevity(length, alpha):
  """GNMT length normalisation ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(x, idx):
  """x [b, n, ...], idx [b, m] -> [b, m, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _top_k(x, k: int):
  """jax.lax.top_k over the last axis of x [b, n]; under a mesh, per batch shard
  (else every prompt's K * vocab candidates would go to every device each step)."""
  ctx = sharding.active_mesh_rules()
  if ctx is None:
    return jax.lax.top_k(x, k)
  mesh, rules = ctx
  return sharding.top_k_per_shard(
      x, k, mesh, sharding.logical_to_spec(sharding.BATCH, rules, mesh.axis_names))


def _reorder_cache(cache, origin):
  """Cache rows b*K + k take the rows b*K + origin[b, k]; parts that are the same
  for all beams of a prompt (encoder-decoder cross keys/values) are left as is.

  A beam's origin is always one of its own prompt's K beams, so each prompt's block
  of K rows is reordered within itself ([b, K, ...], take_along_axis over K): a
  batch-sharded cache stays on its devices. (A take of the global rows b*K + origin
  is one gather over the whole batch: GSPMD all-gathers the whole cache, per layer
  and step.)"""
  b, k = origin.shape

  def one(path, x):
    names = {getattr(p, "key", None) for p in path}
    if names & {"cross", "enc_valid"}:
      return x
    axis = _batch_axis(path)
    blocks = x.reshape(x.shape[:axis] + (b, k) + x.shape[axis + 1:])
    idx = origin.reshape((1,) * axis + (b, k) + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(blocks, idx, axis=axis + 1).reshape(x.shape)

  return jax.tree_util.tree_map_with_path(one, cache)


def _batch_axis(path) -> int:
  """A scanned stack's cache has a leading layers axis, then the batch."""
  return 1 if any(getattr(p, "key", None) == "scanned" for p in path) else 0


def _repeat_rows(cache, times: int):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.repeat(x, times, axis=_batch_axis(path)), cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "steps", "cache_len",
                                             "eos_id", "mesh", "rules"))
def _beam_loop(graphdef, state, prompts, lengths, length_penalty, max_new_tokens,
               num_prompts, *, beam_size, steps, cache_len, eos_id, mesh, rules):
  """As decode._sample_loop: max_new_tokens (traced) into buffers of `steps` tokens;
  rows from num_prompts on are padding."""
  k_beams = beam_size
  neg = jnp.float32(-jnp.inf)
  with decode_batch.mesh_rules(mesh, rules):
    logits, cache, start = prefill(graphdef, state, prompts, lengths, cache_len)
    b, v = logits.shape
    cache = _repeat_rows(cache, k_beams)
    start = jnp.repeat(start, k_beams)
    logits = jnp.broadcast_to(logits[:, None], (b, k_beams, v))
    max_brevity = _brevity(max_new_tokens, length_penalty)

    def update(i, logits, beams):
      """Extends the live beams by token i; returns (beams, live tokens, origins)."""
      alive_seq, alive_lp, fin_seq, fin_score, fin_lp = beams
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      cand = (alive_lp[..., None] + logp).reshape(b, k_beams * v)
      top_lp, top_idx = _top_k(cand, 2 * k_beams)
      origin, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
      seqs = _gather_beams(alive_seq, origin)
      seqs = jax.lax.dynamic_update_slice(seqs, tok[..., None], (0, 0, i))
      eos = decode_batch.is_eos(tok, eos_id)
      # Finished pool: the best K of the old ones and the new EOS hypotheses among
      # the K best candidates (an EOS ranked lower is dropped, as in HF
      # transformers, so that beam_size 1 is greedy search).
      in_top_k = jnp.arange(2 * k_beams) < k_beams
      new_score = jnp.where(eos & in_top_k, top_lp / _brevity(i + 1, length_penalty), neg)
      all_score = jnp.concatenate([fin_score, new_score], axis=1)
      fin_score, idx = _top_k(all_score, k_beams)
      fin_seq = _gather_beams(jnp.concatenate([fin_seq, seqs], axis=1), idx)
      new_lp = jnp.where(eos & in_top_k, top_lp, neg)
      fin_lp = _gather_beams(jnp.concatenate([fin_lp, new_lp], axis=1), idx)
      # Live beams: the best K candidates that did not end in EOS.
      alive_lp, idx = _top_k(jnp.where(eos, neg, top_lp), k_beams)
      beams = (_gather_beams(seqs, idx), alive_lp, fin_seq, fin_score, fin_lp)
      return beams, _gather_beams(tok, idx), _gather_beams(origin, idx)

    def finished(beams):
      _, alive_lp, _, fin_score, _ = beams
      # log p only falls as a beam grows and the normaliser is largest at the
      # maximum length, so alive_lp / max_brevity bounds every continuation
      # (length_penalty >= 0).
      return alive_lp[:, 0] / max_brevity <= fin_score[:, -1]

    beams = (jnp.full((b, k_beams, steps), PAD_ID, jnp.int32),
             jnp.tile(jnp.where(jnp.arange(k_beams) == 0, 0.0, neg), (b, 1)),
             jnp.full((b, k_beams, steps), PAD_ID, jnp.int32),
             jnp.full((b, k_beams), neg), jnp.full((b, k_beams), neg))
    beams, tok, origin = update(0, logits, beams)
    cache = _reorder_cache(cache, origin)

    def cond(carry):
      i, beams = carry[0], carry[-1]
      return (i < max_new_tokens) & ~jnp.all(finished(beams) | (jnp.arange(b) >= num_prompts))

    def body(carry):
      i, cache, tok, beams = carry
      logits, cache = decode_step(graphdef, state, cache, tok.reshape(b * k_beams, 1),
                                  (start + i - 1)[:, None])
      beams, tok, origin = update(i, logits.reshape(b, k_beams, v), beams)
      return i + 1, _reorder_cache(cache, origin), tok, beams

    _, _, _, beams = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, beams))
    alive_seq, alive_lp, fin_seq, fin_score, fin_lp = beams
    # Live beams at the end were cut by max_new_tokens (or cannot win).
    score = jnp.concatenate([fin_score, alive_lp / max_brevity], axis=1)
    seqs = jnp.concatenate([fin_seq, alive_seq], axis=1)
    lps = jnp.concatenate([fin_lp, alive_lp], axis=1)
    best = jnp.argmax(score, axis=1)[:, None]
    return (_gather_beams(seqs, best)[:, 0], _gather_beams(score, best)[:, 0],
            _gather_beams(lps, best)[:, 0])


def beam_search(model, prompts: Sequence[Sequence[int]], *, beam_size: int,
                max_new_tokens: int, max_len: int | None = None,
                length_penalty: float = LENGTH_PENALTY, eos_id: int | None = EOS_ID,
                mesh=None, rules=None, return_scores: bool = False):
  """The best of beam_size beams per prompt (see the module docstring for the
  scoring). With return_scores: (tokens, scores, log_probs), score = log_prob /
  ((5 + n) / 6) ** length_penalty for n new tokens (or max_new_tokens for a beam
  cut by the length limit)."""
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}; use 1 or more.")
  if not 0 <= length_penalty < math.inf:
    raise ValueError(f"length_penalty={length_penalty}; use 0 (none) or more.")
  decode_batch.check_mesh(mesh, rules)
  p = decode_batch.prepare(model, prompts, max_new_tokens, max_len, mesh, rules, eos_id=eos_id)
  graphdef, state = nnx.split(model)
  seqs, scores, lps = _beam_loop(graphdef, state, p.tokens, p.lengths,
                                 jnp.float32(length_penalty), jnp.int32(max_new_tokens),
                                 jnp.int32(p.num), beam_size=beam_size, steps=p.steps,
                                 cache_len=p.cache_len, eos_id=eos_id, mesh=mesh,
                                 rules=decode_batch.static_rules(rules))
  seqs, scores, lps = (np.asarray(x) for x in jax.device_get((seqs, scores, lps)))
  out = [decode_batch.trim(seqs[i, :max_new_tokens], eos_id) for i in range(p.num)]
  if return_scores:
    return out, [float(s) for s in scores[:p.num]], [float(s) for s in lps[:p.num]]
  return out
