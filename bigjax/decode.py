"""Sampling from a decoder-only LM.

This first version recomputes the whole (fixed-shape) window at every step:
simple and exact, fine for short samples. Right-hand positions beyond the
current length hold padding, which the causal mask keeps out of view.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.transformer import PAD_ID


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _sample_loop(graphdef, state, tokens, length, rng, temperature, max_new_tokens, greedy):
  batch = jnp.arange(tokens.shape[0])

  def body(i, carry):
    tokens, length = carry
    # A fresh module per trace: layers that sow metrics (MoE) stay functional.
    logits = nnx.merge(graphdef, state)(tokens)[batch, length - 1]
    if greedy:
      nxt = jnp.argmax(logits, -1)
    else:
      nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature)
    tokens = tokens.at[batch, length].set(nxt.astype(tokens.dtype))
    return tokens, length + 1

  return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, length))[0]


def sample(model, prompts: list[list[int]], *, max_new_tokens: int, max_len: int,
           temperature: float = 1.0, seed: int = 0) -> list[list[int]]:
  """Continues each prompt by max_new_tokens tokens (temperature 0: greedy)."""
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > max_len:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                     f"exceeds the model's max_len={max_len}; shorten one of them.")
  tokens = jnp.full((len(prompts), longest + max_new_tokens), PAD_ID, jnp.int32)
  for i, p in enumerate(prompts):
    tokens = tokens.at[i, :len(p)].set(jnp.asarray(p, jnp.int32))
  length = jnp.asarray([len(p) for p in prompts], jnp.int32)
  graphdef, state = nnx.split(model)
  out = _sample_loop(graphdef, state, tokens, length, jax.random.PRNGKey(seed),
                     jnp.float32(max(temperature, 1e-6)), max_new_tokens, temperature <= 0)
  return [list(map(int, out[i, len(p):len(p) + max_new_tokens]))
          for i, p in enumerate(prompts)]
