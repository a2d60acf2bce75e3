"""Autoregressive decoding with a key/value cache, for decoder-only and
encoder-decoder models (dense or MoE).

Design
- The cache, the prefill and one decode step are `bigjax.kv_cache` (re-exported
  here): functional, fixed-shape, right-padded prompts with per-row positions.
- Compiling: the prompts' length, their number and max_new_tokens are each rounded
  up to a bucket (`_bucket`: powers of two, then multiples of 128; within max_len)
  and the number of new tokens is a traced value, so a notebook's next prompt or
  length mostly reuses the compiled loop instead of compiling another.
- Stopping: a row stops at EOS (`eos_id`, the tokenizer's EOS=2; None: never) or
  after max_new_tokens; the loop ends when every row has stopped. Returned
  sequences include the EOS.
- Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k,
  then top-p (nucleus: the smallest set of most likely tokens whose probability
  mass is >= top_p), then a categorical draw. Token i of row r uses the key
  fold_in(fold_in(PRNGKey(seed), r), i): a row's sample depends on the seed and its
  own logits only, not on the rest of the batch or the mesh.
- Beam search (`beam_search`): 2K candidates per step so that K beams stay alive
  after EOS hypotheses are set aside; an EOS candidate ranked among the K best
  becomes a finished hypothesis (so beam_size 1 is greedy search), scoring
  log p / ((5 + n) / 6) ** length_penalty for n new tokens, EOS included (GNMT);
  a row stops once its best live beam cannot beat its worst finished one, and
  returns its best finished hypothesis (or live beam, if cut by the length limit).
- Sharding: pass `mesh` and `rules` (e.g. task.mesh, task.rules) to trace under
  `sharding.use_mesh_rules`: the cache and activations are then constrained like
  the training activations (batch over data/fsdp, heads over tensor). The batch,
  a power of two of rows, is padded further to a multiple of the data-parallel size.
- MoE: decoding runs in eval mode (eval capacity factor, no random routing or
  jitter). A decode step routes each row's one token as its own group (no drops);
  the prefill routes the prompt as the training forward does (groups of
  group_size tokens, or the prompt length). So cached decoding equals full
  recomputation exactly only when no token is dropped in either, e.g. with
  model.moe.eval_capacity_factor >= num_experts / k, or with the dropless router.
  The same condition keeps a row's logits its own: a prompt's groups include its
  right padding up to the bucketed width, and padding takes expert slots like any
  token (as in HF's Switch Transformers), so where capacity binds, a prompt's
  prefill depends on that width (and the batch's rows on each other).

`generate_recompute` is the cache-free reference: it reruns the whole fixed-shape
window at every step (the first version of this module), with the same stopping
and sampling rules and keys, for tests and benchmarks.
"""
import contextlib
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import sharding
from bigjax.data.tokenizer import BOS_ID, EOS_ID
from bigjax.kv_cache import decode_step, init_cache, is_encdec, prefill  # noqa: F401
from bigjax.models.transformer import PAD_ID

# --------------------------------------------------------------------------
# Functional building blocks
# --------------------------------------------------------------------------


# Beam search's default brevity exponent (GNMT's length normalisation), as T5X's.
LENGTH_PENALTY = 0.6


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


def _is_eos(tokens, eos_id):
  return tokens == eos_id if eos_id is not None else jnp.zeros(tokens.shape, bool)


def _token_logprob(logits, tokens):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _mesh_rules(mesh, rules):
  if mesh is None:
    return contextlib.nullcontext()
  return sharding.use_mesh_rules(mesh, rules)


# --------------------------------------------------------------------------
# Jitted loops
# --------------------------------------------------------------------------

# Shapes are bucketed (`_bucket`) and the number of new tokens is traced, so that
# calls with other prompt lengths or max_new_tokens mostly reuse a compiled loop.
_STATIC = ("graphdef", "steps", "cache_len", "greedy", "eos_id", "mesh", "rules")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_loop(graphdef, state, prompts, lengths, rng, temperature, top_k, top_p,
                 max_new_tokens, num_prompts, *, steps, cache_len, greedy, eos_id, mesh,
                 rules):
  """max_new_tokens (traced) new tokens per row into a [b, steps] buffer; rows from
  num_prompts on are padding, done from the start (they would keep the loop going)."""
  with _mesh_rules(mesh, rules):
    logits, cache, start = prefill(graphdef, state, prompts, lengths, cache_len)
    b = prompts.shape[0]
    keys = _row_keys(rng, b)
    choose = functools.partial(_choose, row_keys=keys, temperature=temperature,
                               top_k=top_k, top_p=top_p, greedy=greedy)
    tok = choose(logits, i=0)
    out = jnp.full((b, steps), PAD_ID, jnp.int32).at[:, 0].set(tok)
    logprob = _token_logprob(logits, tok)
    done = _is_eos(tok, eos_id) | (jnp.arange(b) >= num_prompts)

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
      return i + 1, cache, new, out, logprob, done | _is_eos(new, eos_id)

    carry = (jnp.int32(1), cache, tok, out, logprob, done)
    _, _, _, out, logprob, _ = jax.lax.while_loop(cond, body, carry)
    return out, logprob


@functools.partial(jax.jit, static_argnames=_STATIC)
def _recompute_loop(graphdef, state, prompts, lengths, rng, temperature, top_k, top_p,
                    max_new_tokens, num_prompts, *, steps, cache_len, greedy, eos_id, mesh,
                    rules):
  """Reference without a cache: the whole [b, cache_len] window at every step."""
  with _mesh_rules(mesh, rules):
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
      return i + 1, window, logprob, done | _is_eos(new, eos_id), state_

    def cond(carry):
      i, done = carry[0], carry[-2]
      return (i < max_new_tokens) & ~jnp.all(done)

    carry = (jnp.int32(0), window, jnp.zeros((b,), jnp.float32), jnp.arange(b) >= num_prompts,
             state)
    _, window, logprob, _, _ = jax.lax.while_loop(cond, body, carry)
    idx = start[:, None] + jnp.arange(steps)[None, :]
    return jnp.take_along_axis(window, jnp.minimum(idx, cache_len - 1), axis=1), logprob


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
  """As _sample_loop: max_new_tokens (traced) into buffers of `steps` tokens; rows
  from num_prompts on are padding."""
  k_beams = beam_size
  neg = jnp.float32(-jnp.inf)
  with _mesh_rules(mesh, rules):
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
      eos = _is_eos(tok, eos_id)
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


# --------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------


def _model_max_len(model) -> int | None:
  positions = getattr(getattr(model, "embedder", None), "positions", None)
  return getattr(positions, "max_len", None)


def _bucket(n: int) -> int:
  """n rounded up to a power of two (at least 8), or past 128 to a multiple of 128:
  calls whose lengths share buckets share a compiled loop, at the cost of up to 2x
  the padding for short lengths (< 128 positions for long ones)."""
  return max(8, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128


def _within(n: int, limit: int | None) -> int:
  return n if limit is None else min(n, limit)


def _fit_buckets(longest: int, new: int, max_len: int | None) -> tuple[int, int]:
  """A decoder's (prompt width, new-token buffer): both bucketed; where the two
  buckets pass max_len, the cache is max_len long and keeps one bucket whole, so
  that nearby lengths still share a shape."""
  width, steps = _bucket(longest), _bucket(new)
  if max_len is None or width + steps <= max_len:
    return width, steps
  if longest + steps <= max_len:  # Keep the new tokens' bucket: the prompts' width
    # then depends on max_len alone, so every prompt that fits shares the shape.
    return max_len - steps, steps
  if width + new <= max_len:
    return width, max_len - width
  return longest, max_len - longest


class _Prepared(NamedTuple):
  tokens: jax.Array  # [rows, width] right-padded prompts; rows past `num` copy row 0.
  lengths: jax.Array  # [rows]
  steps: int  # New-token buffer length, >= max_new_tokens.
  cache_len: int
  num: int  # Real prompts.


def _prepare(model, prompts, max_new_tokens: int, max_len: int | None, mesh, rules, *,
             eos_id: int | None = None):
  """The prompts as the jitted loops take them, every shape bucketed (`_bucket`),
  within max_len."""
  encdec = is_encdec(model)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one token.")
  prompts = list(prompts)  # Read once: a generator would be spent by the check below.
  if any(np.ndim(p) == 0 for p in prompts):
    raise ValueError("prompts is a list of prompts, each a list of token ids: pass one "
                     "prompt as [ids].")
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError("No prompts given.")
  vocab = model.embedder.tokens.embedding.shape[0]
  if eos_id is not None and not 0 <= eos_id < vocab:  # No row would ever stop there.
    raise ValueError(f"eos_id={eos_id} is outside the model's vocabulary [0, {vocab}); "
                     "pass the tokenizer's EOS id, or None to stop at max_new_tokens.")
  for i, p in enumerate(prompts):
    if p.size == 0:
      raise ValueError(f"Prompt {i} is empty; give at least one token.")
    if p.min() < 0 or p.max() >= vocab:
      bad = int(p[(p < 0) | (p >= vocab)][0])
      raise ValueError(f"Prompt {i} holds token id {bad}, outside the model's vocabulary "
                       f"[0, {vocab}); encode it with the model's tokenizer.")
    if (p == PAD_ID).any():  # It would be read as a token, its key masked: other text.
      raise ValueError(f"Prompt {i} holds the padding id {PAD_ID}; pass prompts unpadded "
                       "(lists of different lengths), not a padded array.")
  longest = max(p.size for p in prompts)
  table = _model_max_len(model)
  if max_len is None:
    max_len = table
  elif table is not None and max_len > table:
    # Positions past a learned table would read rows that do not exist.
    raise ValueError(f"max_len={max_len} exceeds the model's {table} learned positions; "
                     f"pass max_len <= {table}, or None for the model's own.")
  if encdec:
    if max_len is not None and (longest > max_len or 1 + max_new_tokens > max_len):
      raise ValueError(f"encoder input ({longest} tokens) and BOS + max_new_tokens "
                       f"({1 + max_new_tokens}) must each fit the model's max_len={max_len}; "
                       "shorten them.")
    # Bucketed, but within max_len: padding is free of positions only up to there.
    width = _within(_bucket(longest), max_len)
    steps = _within(_bucket(max_new_tokens), None if max_len is None else max_len - 1)
    cache_len = 1 + steps  # BOS + the new tokens.
  else:
    if max_len is not None and longest + max_new_tokens > max_len:
      fix = (f"lower max_new_tokens to {max_len - longest} or less" if longest < max_len
             else f"shorten the prompt to {max_len - max_new_tokens} tokens or less"
             if max_new_tokens < max_len else
             f"lower max_new_tokens below {max_len} and shorten the prompt to fit")
      raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                       f"exceeds the model's max_len={max_len}; {fix}.")
    width, steps = _fit_buckets(longest, max_new_tokens, max_len)
    cache_len = width + steps
  num = len(prompts)
  rows = 1 << (num - 1).bit_length()  # A power of two: most prompt counts share a compile.
  if mesh is not None:  # Each batch shard gets whole rows.
    dp = sharding.data_parallel_size(mesh.shape, rules)
    rows = -(-rows // dp) * dp
  tokens = np.full((rows, width), PAD_ID, np.int32)
  lengths = np.empty((rows,), np.int32)
  # Rows past the prompts copy prompt 0 (an empty row would have no last token to
  # read logits at); the loops treat them as done, and their output is dropped.
  for i in range(rows):
    p = prompts[i] if i < num else prompts[0]
    tokens[i, :p.size] = p
    lengths[i] = p.size
  return _Prepared(jnp.asarray(tokens), jnp.asarray(lengths), steps, cache_len, num)


def _static_rules(rules):
  if rules is None:
    return None
  return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in rules)


def _check_mesh(mesh, rules):
  if (mesh is None) != (rules is None):
    raise ValueError("Pass mesh and rules together (e.g. task.mesh, task.rules), or neither.")


def _trim(row, eos_id) -> list[int]:
  row = [int(t) for t in row]
  if eos_id is not None and eos_id in row:
    row = row[:row.index(eos_id) + 1]
  return row


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
  _check_mesh(mesh, rules)
  p = _prepare(model, prompts, max_new_tokens, max_len, mesh, rules, eos_id=eos_id)
  graphdef, state = nnx.split(model)
  out, logprob = loop(graphdef, state, p.tokens, p.lengths, jax.random.PRNGKey(seed),
                      jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
                      jnp.float32(top_p), jnp.int32(max_new_tokens), jnp.int32(p.num),
                      steps=p.steps,
                      cache_len=p.cache_len, greedy=temperature <= 0, eos_id=eos_id,
                      mesh=mesh, rules=_static_rules(rules))
  out, logprob = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(logprob))
  seqs = [_trim(out[i, :max_new_tokens], eos_id) for i in range(p.num)]
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
    found = beam_search(model, prompts, beam_size=beam_size, max_new_tokens=max_new_tokens,
                        max_len=max_len, length_penalty=length_penalty, eos_id=eos_id,
                        mesh=mesh, rules=rules, return_scores=return_scores)
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


def beam_search(model, prompts: Sequence[Sequence[int]], *, beam_size: int,
                max_new_tokens: int, max_len: int | None = None, length_penalty: float = LENGTH_PENALTY,
                eos_id: int | None = EOS_ID, mesh=None, rules=None,
                return_scores: bool = False):
  """The best of beam_size beams per prompt (see the module docstring for the
  scoring). With return_scores: (tokens, scores, log_probs), score = log_prob /
  ((5 + n) / 6) ** length_penalty for n new tokens (or max_new_tokens for a beam
  cut by the length limit)."""
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}; use 1 or more.")
  if not 0 <= length_penalty < math.inf:
    raise ValueError(f"length_penalty={length_penalty}; use 0 (none) or more.")
  _check_mesh(mesh, rules)
  p = _prepare(model, prompts, max_new_tokens, max_len, mesh, rules, eos_id=eos_id)
  graphdef, state = nnx.split(model)
  seqs, scores, lps = _beam_loop(graphdef, state, p.tokens, p.lengths,
                                 jnp.float32(length_penalty), jnp.int32(max_new_tokens),
                                 jnp.int32(p.num), beam_size=beam_size, steps=p.steps, cache_len=p.cache_len,
                                 eos_id=eos_id, mesh=mesh, rules=_static_rules(rules))
  seqs, scores, lps = (np.asarray(x) for x in jax.device_get((seqs, scores, lps)))
  out = [_trim(seqs[i, :max_new_tokens], eos_id) for i in range(p.num)]
  if return_scores:
    return out, [float(s) for s in scores[:p.num]], [float(s) for s in lps[:p.num]]
  return out


def sample(model, prompts: list[list[int]], *, max_new_tokens: int, max_len: int,
           temperature: float = 1.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None = EOS_ID) -> list[list[int]]:
  """Continues each prompt by up to max_new_tokens tokens (temperature 0: greedy),
  stopping early at EOS. Called by the LM tasks' samples and the notebooks; see `generate`."""
  return generate(model, prompts, max_new_tokens=max_new_tokens, max_len=max_len,
                  temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                  seed=seed)
