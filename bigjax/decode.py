"""Autoregressive decoding by sampling (greedy included) with a key/value cache, for
decoder-only and encoder-decoder models (dense or MoE). Beam search is
bigjax/beam_search.py; the prompts' bucketed batches and the mesh, bigjax/decode_batch.py.

Design
- The cache, the prefill and one decode step are `bigjax.kv_cache` (re-exported
  here): functional, fixed-shape, right-padded prompts with per-row positions.
- Stopping: a row stops at EOS (`eos_id`, the tokenizer's EOS=2; None: never) or
  after max_new_tokens; the loop ends when every row has stopped. Returned
  sequences include the EOS.
- Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k,
  then top-p (nucleus: the smallest set of most likely tokens whose probability
  mass is >= top_p), then a categorical draw. Token i of row r uses the key
  fold_in(fold_in(PRNGKey(seed), r), i): a row's sample depends on the seed and its
  own logits only, not on the rest of the batch or the mesh.
- MoE: decoding runs in eval mode (eval capacity factor, no random routing or
  jitter). A decode step routes each row's one token as its own group (no drops);
  the prefill routes the prompt as the training forward does (groups of
  group_size tokens, or the prompt length). So cached decoding equals full
  recomputation exactly only when no token is dropped in either, e.g. with
  model.moe.eval_capacity_factor >= num_experts / k, or with the dropless router.
  The same condition keeps a row's logits its own: a prompt's groups include its
  right padding up to the bucketed width; padding takes no expert slot, but the
  capacity follows the group size, so where capacity binds, a prompt's prefill
  depends on that width.

`generate_recompute` is the cache-free reference: it reruns the whole fixed-shape
window at every step (the first version of this module), with the same stopping
and sampling rules and keys, for tests and benchmarks.
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import beam_search as beam_search_lib, decode_batch
from bigjax.beam_search import LENGTH_PENALTY
from bigjax.data.tokenizer import BOS_ID, EOS_ID
from bigjax.kv_cache import decode_step, init_cache, is_encdec, prefill  # noqa: F401
from bigjax.models.transformer import PAD_ID

beam_search = beam_search_lib.beam_search  # Its home is beam_search.py.

# --------------------------------------------------------------------------
# Functional building blocks
# --------------------------------------------------------------------------


def filter_logits(logits, top_k=0, top_p=1.0):
  """Keeps the top_k largest logits (0: all), then of those the smallest set of
  most likely tokens whose probability mass is >= top_p (1.0: all); the rest
  become -inf. Ties are broken towards the lower token id, so the sets have
  exactly those sizes. top_k and top_p may be traced.
  """
  v = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1, stable=True)  # token ids, most likely first
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  top_k = jnp.asarray(top_k, jnp.int32)
  in_top_k = jnp.arange(v) < jnp.where(top_k > 0, top_k, v)
  probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf).astype(jnp.float32), axis=-1)
  # Mass of the more likely tokens (exclusive cumsum: exactly 0 for the first).
  mass_before = jnp.concatenate(
      [jnp.zeros_like(probs[..., :1]), jnp.cumsum(probs, axis=-1)[..., :-1]], axis=-1)
  keep_ranked = in_top_k & ((mass_before < top_p) | (jnp.asarray(top_p) >= 1.0))
  keep = jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, jnp.array(-jnp.inf, logits.dtype))


def _row_keys(rng, num_rows: int):
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_rows))


def _choose(logits, row_keys, i, temperature, top_k, top_p, greedy: bool):
  """Next token [b] from logits [b, vocab] (token index i of the continuation)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits / temperature, top_k, top_p)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def _token_logprob(logits, tokens):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------
# Jitted loops
# --------------------------------------------------------------------------

# Shapes are bucketed (`decode_batch.bucket`) and the number of new tokens is traced,
# so that calls with other prompt lengths or max_new_tokens mostly reuse a compiled loop.
_STATIC = ("graphdef", "steps", "cache_len", "greedy", "eos_id", "mesh", "rules")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_loop(graphdef, state, prompts, lengths, rng, temperature, top_k, top_p,
                 max_new_tokens, num_prompts, *, steps, cache_len, greedy, eos_id, mesh,
                 rules):
  """max_new_tokens (traced) new tokens per row into a [b, steps] buffer; rows from
  num_prompts on are padding, done from the start (they would keep the loop going)."""
  with decode_batch.mesh_rules(mesh, rules):
    logits, cache, start = prefill(graphdef, state, prompts, lengths, cache_len)
    b = prompts.shape[0]
    keys = _row_keys(rng, b)
    choose = functools.partial(_choose, row_keys=keys, temperature=temperature,
                               top_k=top_k, top_p=top_p, greedy=greedy)
    tok = choose(logits, i=0)
    out = jnp.full((b, steps), PAD_ID, jnp.int32).at[:, 0].set(tok)
    logprob = _token_logprob(logits, tok)
    done = decode_batch.is_eos(tok, eos_id) | (jnp.arange(b) >= num_prompts)

    def cond(carry):
      i, done = carry[0], carry[-1]
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      i, cache, tok, out, logprob, done = carry
      logits, cache = decode_step(graphdef, state, cache, tok[:, None],
                                  (start + i - 1)[:, None])
      new = jnp.where(done, PAD_ID, choose(logits[:, 0], i=i))
      logprob += jnp.where(done, 0.0, _token_logprob(logits[:, 0], new))
      out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
      return i + 1, cache, new, out, logprob, done | decode_batch.is_eos(new, eos_id)

    carry = (jnp.int32(1), cache, tok, out, logprob, done)
    _, _, _, out, logprob, _ = jax.lax.while_loop(cond, body, carry)
    return out, logprob


@functools.partial(jax.jit, static_argnames=_STATIC)
def _recompute_loop(graphdef, state, prompts, lengths, rng, temperature, top_k, top_p,
                    max_new_tokens, num_prompts, *, steps, cache_len, greedy, eos_id, mesh,
                    rules):
  """Reference without a cache: the whole [b, cache_len] window at every step."""
  with decode_batch.mesh_rules(mesh, rules):
    model = nnx.merge(graphdef, state)
    b, length = prompts.shape
    rows = jnp.arange(b)
    window = jnp.full((b, cache_len), PAD_ID, jnp.int32)
    if is_encdec(model):
      encoded = model.encode(prompts)
      window = window.at[:, 0].set(BOS_ID)
      start = jnp.ones((b,), jnp.int32)
    else:
      window = window.at[:, :length].set(prompts)
      start = lengths.astype(jnp.int32)
    keys = _row_keys(rng, b)

    def body(carry):
      i, window, logprob, done, state_ = carry
      # A fresh module per trace from the carried state, so that its variables
      # belong to the loop's trace (nnx.remat refuses outer-trace variables).
      m = nnx.merge(graphdef, state_)
      if is_encdec(m):
        all_logits = m.decode(encoded, prompts, window)
      else:
        all_logits = m(window)
      logits = all_logits[rows, start + i - 1]
      new = _choose(logits, keys, i, temperature, top_k, top_p, greedy)
      new = jnp.where(done, PAD_ID, new)
      logprob += jnp.where(done, 0.0, _token_logprob(logits, new))
      window = window.at[rows, start + i].set(new)
      return i + 1, window, logprob, done | decode_batch.is_eos(new, eos_id), state_

    def cond(carry):
      i, done = carry[0], carry[-2]
      return (i < max_new_tokens) & ~jnp.all(done)

    carry = (jnp.int32(0), window, jnp.zeros((b,), jnp.float32), jnp.arange(b) >= num_prompts,
             state)
    _, window, logprob, _, _ = jax.lax.while_loop(cond, body, carry)
    idx = start[:, None] + jnp.arange(steps)[None, :]
    return jnp.take_along_axis(window, jnp.minimum(idx, cache_len - 1), axis=1), logprob


# --------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------


def _check_sampling(temperature, top_k, top_p):
  if top_k < 0:
    raise ValueError(f"top_k={top_k}; use 0 (off) or a positive number of tokens.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}; use a probability mass in (0, 1] (1: off).")
  if not 0 <= temperature < math.inf:  # NaN too: it would decode padding, silently.
    raise ValueError(f"temperature={temperature}; use 0 (greedy) or a positive value.")


def _run_sampler(loop, model, prompts, *, max_new_tokens, max_len, temperature, top_k, top_p,
                 eos_id, seed, mesh, rules, return_scores):
  _check_sampling(temperature, top_k, top_p)
  decode_batch.check_mesh(mesh, rules)
  p = decode_batch.prepare(model, prompts, max_new_tokens, max_len, mesh, rules, eos_id=eos_id)
  graphdef, state = nnx.split(model)
  out, logprob = loop(graphdef, state, p.tokens, p.lengths, jax.random.PRNGKey(seed),
                      jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
                      jnp.float32(top_p), jnp.int32(max_new_tokens), jnp.int32(p.num),
                      steps=p.steps,
                      cache_len=p.cache_len, greedy=temperature <= 0, eos_id=eos_id,
                      mesh=mesh, rules=decode_batch.static_rules(rules))
  out, logprob = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(logprob))
  seqs = [decode_batch.trim(out[i, :max_new_tokens], eos_id) for i in range(p.num)]
  return (seqs, [float(x) for x in logprob[:p.num]]) if return_scores else seqs


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             max_len: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, beam_size: int = 1, length_penalty: float = LENGTH_PENALTY,
             eos_id: int | None = EOS_ID, seed: int = 0, mesh=None, rules=None,
             return_scores: bool = False):
  """Continues each prompt (a list of token ids) with the KV cache.

  Returns one list of new token ids per prompt, ending with eos_id if the row
  stopped there (at most max_new_tokens). temperature 0 is greedy; top_k /
  top_p filter the sampling distribution; beam_size > 1 runs beam search
  (deterministic; temperature must be 0). For encoder-decoder models the prompts
  are encoder inputs. With return_scores: (tokens, scores), the score being the
  sum of the model's log-probabilities of the new tokens (beam search: divided by
  the length penalty).
  """
  if beam_size > 1:
    if (temperature, top_k, top_p) != (0, 0, 1):
      raise ValueError("beam search is deterministic: use temperature=0, top_k=0 and top_p=1 "
                       "with beam_size > 1.")
    found = beam_search_lib.beam_search(
        model, prompts, beam_size=beam_size, max_new_tokens=max_new_tokens, max_len=max_len,
        length_penalty=length_penalty, eos_id=eos_id, mesh=mesh, rules=rules,
        return_scores=return_scores)
    return found[:2] if return_scores else found
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}; use 1 (no beam search) or more.")
  return _run_sampler(_sample_loop, model, prompts, max_new_tokens=max_new_tokens,
                      max_len=max_len, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=eos_id, seed=seed, mesh=mesh, rules=rules,
                      return_scores=return_scores)


def generate_recompute(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       max_len: int | None = None, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, eos_id: int | None = EOS_ID, seed: int = 0,
                       mesh=None, rules=None, return_scores: bool = False):
  """As `generate` (no beam search) without a cache: every step reruns the model
  on the whole window. The reference for tests and benchmarks."""
  return _run_sampler(_recompute_loop, model, prompts, max_new_tokens=max_new_tokens,
                      max_len=max_len, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=eos_id, seed=seed, mesh=mesh, rules=rules,
                      return_scores=return_scores)


def sample(model, prompts: list[list[int]], *, max_new_tokens: int, max_len: int,
           temperature: float = 1.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None = EOS_ID) -> list[list[int]]:
  """Continues each prompt by up to max_new_tokens tokens (temperature 0: greedy),
  stopping early at EOS. Called by the LM tasks' samples and the notebooks; see `generate`."""
  return generate(model, prompts, max_new_tokens=max_new_tokens, max_len=max_len,
                  temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                  seed=seed)
