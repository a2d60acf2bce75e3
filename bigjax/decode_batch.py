"""Prompts as the fixed-shape batches that the decoding loops (`bigjax.decode`'s
sampling, `bigjax.beam_search`) compile for, and what both loops share around them:
the checks of prompts, lengths, mesh and rules, and the trimming of the output rows.

- Compiling: the prompts' length, their number and max_new_tokens are each rounded
  up to a bucket (`bucket`: powers of two, then multiples of 128; within max_len)
  and the number of new tokens is a traced value, so a notebook's next prompt or
  length mostly reuses the compiled loop instead of compiling another.
- Sharding: pass `mesh` and `rules` (e.g. task.mesh, task.rules) to trace under
  `sharding.use_mesh_rules`: the cache and activations are then constrained like
  the training activations (batch over data/fsdp, heads over tensor). The batch,
  a power of two of rows, is padded further to a multiple of the data-parallel size.
"""
import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import sharding
from bigjax.kv_cache import is_encdec
from bigjax.models.transformer import PAD_ID


def mesh_rules(mesh, rules):
  """The context a loop traces under: `sharding.use_mesh_rules`, or none without a mesh."""
  if mesh is None:
    return contextlib.nullcontext()
  return sharding.use_mesh_rules(mesh, rules)


def is_eos(tokens, eos_id):
  return tokens == eos_id if eos_id is not None else jnp.zeros(tokens.shape, bool)


def model_max_len(model) -> int | None:
  positions = getattr(getattr(model, "embedder", None), "positions", None)
  return getattr(positions, "max_len", None)


def bucket(n: int) -> int:
  """n rounded up to a power of two (at least 8), or past 128 to a multiple of 128:
  calls whose lengths share buckets share a compiled loop, at the cost of up to 2x
  the padding for short lengths (< 128 positions for long ones)."""
  return max(8, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128


def _within(n: int, limit: int | None) -> int:
  return n if limit is None else min(n, limit)


def fit_buckets(longest: int, new: int, max_len: int | None) -> tuple[int, int]:
  """A decoder's (prompt width, new-token buffer): both bucketed; where the two
  buckets pass max_len, the cache is max_len long and keeps one bucket whole, so
  that nearby lengths still share a shape."""
  width, steps = bucket(longest), bucket(new)
  if max_len is None or width + steps <= max_len:
    return width, steps
  if longest + steps <= max_len:  # Keep the new tokens' bucket: the prompts' width
    # then depends on max_len alone, so every prompt that fits shares the shape.
    return max_len - steps, steps
  if width + new <= max_len:
    return width, max_len - width
  return longest, max_len - longest


class Prepared(NamedTuple):
  tokens: jax.Array  # [rows, width] right-padded prompts; rows past `num` copy row 0.
  lengths: jax.Array  # [rows]
  steps: int  # New-token buffer length, >= max_new_tokens.
  cache_len: int
  num: int  # Real prompts.


def prepare(model, prompts, max_new_tokens: int, max_len: int | None, mesh, rules, *,
            eos_id: int | None = None) -> Prepared:
  """The prompts as the jitted loops take them, every shape bucketed (`bucket`),
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
  table = model_max_len(model)
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
    width = _within(bucket(longest), max_len)
    steps = _within(bucket(max_new_tokens), None if max_len is None else max_len - 1)
    cache_len = 1 + steps  # BOS + the new tokens.
  else:
    if max_len is not None and longest + max_new_tokens > max_len:
      fix = (f"lower max_new_tokens to {max_len - longest} or less" if longest < max_len
             else f"shorten the prompt to {max_len - max_new_tokens} tokens or less"
             if max_new_tokens < max_len else
             f"lower max_new_tokens below {max_len} and shorten the prompt to fit")
      raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                       f"exceeds the model's max_len={max_len}; {fix}.")
    width, steps = fit_buckets(longest, max_new_tokens, max_len)
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
  return Prepared(jnp.asarray(tokens), jnp.asarray(lengths), steps, cache_len, num)


def static_rules(rules):
  """rules as a hashable tuple of tuples: the loops take them as a static argument."""
  if rules is None:
    return None
  return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in rules)


def check_mesh(mesh, rules):
  if (mesh is None) != (rules is None):
    raise ValueError("Pass mesh and rules together (e.g. task.mesh, task.rules), or neither.")


def trim(row, eos_id) -> list[int]:
  """An output row as token ids, up to and including its first EOS."""
  row = [int(t) for t in row]
  if eos_id is not None and eos_id in row:
    row = row[:row.index(eos_id) + 1]
  return row
