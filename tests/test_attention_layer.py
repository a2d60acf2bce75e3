"""Tests of bigjax.models.attention: attention.Attention (multi-head and
grouped-query, with or without rotary positions and biases, causal row blocks
included), the causal and padding masks, and attention.rotary. The reference is
attention and rotary written out in float64 numpy, one head and one frequency at
a time; the causal blocks' gradients are held to the unblocked computation's."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import attention, transformer
from tests.layer_helpers import _cfg, _np


# --------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------


def np_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def np_rotary(x, positions, base=10_000.0):
  """Half-split rotary on x [b, t, h, d] written out per frequency."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  half = d // 2
  out = np.empty_like(x)
  for i in range(half):
    theta = base ** (-2.0 * i / d)
    ang = np.asarray(positions, np.float64)[:, :, None] * theta  # [b, t, 1]
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * np.cos(ang) - b * np.sin(ang)
    out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
  return out


def np_attention(x_q, x_kv, mask, wq, wk, wv, wo, q_pos=None, k_pos=None, biases=(0, 0, 0, 0)):
  """Multi-head attention, one head at a time; query head i reads kv head i // g.
  `biases`: added to the query, key, value and output projections."""
  x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
  mask = np.asarray(mask)
  h, kvh, d = wq.shape[1], wk.shape[1], wq.shape[2]
  g = h // kvh
  q = np.einsum("bte,ehd->bthd", x_q, wq) + biases[0]
  k = np.einsum("bse,ehd->bshd", x_kv, wk) + biases[1]
  v = np.einsum("bse,ehd->bshd", x_kv, wv) + biases[2]
  if q_pos is not None:
    q, k = np_rotary(q, q_pos), np_rotary(k, k_pos)
  y = np.zeros(x_q.shape)
  for i in range(h):
    j = i // g
    s = q[:, :, i] @ k[:, :, j].transpose(0, 2, 1) / math.sqrt(d)  # [b, t, s]
    s = np.where(mask[:, 0], s, -1e30)
    p = np_softmax(s)
    y += (p @ v[:, :, j]) @ wo[i]
  return y + biases[3]


def _random_mask(rng, b, t, s):
  m = rng.random((b, 1, t, s)) < 0.6
  m[..., 0] = True  # every query sees at least one key
  return m


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rotary_positions", [False, True])
def test_attention_matches_numpy(num_kv_heads, rotary_positions):
  cfg = _cfg(num_kv_heads=num_kv_heads)
  attn = attention.Attention(cfg, rotary_positions=rotary_positions, rngs=nnx.Rngs(0))
  assert attn.key[...].shape == (32, num_kv_heads, 8)
  rng = np.random.default_rng(0)
  b, t, s = 2, 5, 7
  x_q = rng.normal(size=(b, t, 32)).astype(np.float32)
  x_kv = rng.normal(size=(b, s, 32)).astype(np.float32)
  mask = _random_mask(rng, b, t, s)
  q_pos = np.stack([np.arange(t), np.arange(t) + 3]).astype(np.int32)
  k_pos = np.stack([np.arange(s), np.arange(s) + 1]).astype(np.int32)
  got = attn(jnp.asarray(x_q), jnp.asarray(x_kv), jnp.asarray(mask),
             jnp.asarray(q_pos), jnp.asarray(k_pos))
  want = np_attention(x_q, x_kv, mask, _np(attn.query), _np(attn.key), _np(attn.value),
                      _np(attn.out), *((q_pos, k_pos) if rotary_positions else ()))
  assert got.shape == (b, t, 32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # The reference is not trivially flat: masking changes the answer.
  unmasked = np_attention(x_q, x_kv, np.ones_like(mask), _np(attn.query), _np(attn.key),
                          _np(attn.value), _np(attn.out),
                          *((q_pos, k_pos) if rotary_positions else ()))
  assert np.abs(unmasked - want).max() > 1e-2


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_causal_blocks_match_numpy_and_the_unblocked_gradients(num_kv_heads, monkeypatch):
  """Causal row blocks (CAUSAL_BLOCKS), padded keys too: the output is numpy's
  full-mask attention's, the gradients those of the unblocked computation."""
  assert [attention.causal_block_count(t) for t in (64, 100, 128, 192, 256, 4096)] == [
      1, 1, 2, 3, 4, 4]
  monkeypatch.setattr(attention, "CAUSAL_BLOCK_ROWS", 4)
  cfg = _cfg(num_kv_heads=num_kv_heads)
  causal = attention.Attention(cfg, rotary_positions=True, causal=True, rngs=nnx.Rngs(0))
  plain = attention.Attention(cfg, rotary_positions=True, rngs=nnx.Rngs(0))
  b, t = 2, 4 * attention.CAUSAL_BLOCKS
  rng = np.random.default_rng(5)
  x = rng.normal(size=(b, t, 32)).astype(np.float32)
  pos = np.stack([np.arange(t), np.arange(t) + 3]).astype(np.int32)
  mask = np.asarray(attention.causal_mask(jnp.asarray(pos), jnp.asarray(pos)))
  mask = mask & (np.arange(t) % 5 != 2)[None, None, None, :]  # Some padded keys.
  mask[..., 0] = True
  args = (jnp.asarray(x), jnp.asarray(x), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(pos))
  got = causal(*args)
  want = np_attention(x, x, mask, _np(causal.query), _np(causal.key), _np(causal.value),
                      _np(causal.out), pos, pos)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  weights = rng.normal(size=(b, t, 32)).astype(np.float32)
  def loss(module, x):
    return jnp.sum(module(x, x, *args[2:]) * weights)
  grads = [nnx.grad(loss, argnums=(0, 1))(m, args[0]) for m in (causal, plain)]
  for a, c in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
  # The blocks are in play: two einsums (scores, values) per block, against two.
  def dots(module):
    return str(jax.make_jaxpr(lambda *a: module(*a))(*args)).count("dot_general")
  assert dots(causal) - dots(plain) == 2 * (attention.CAUSAL_BLOCKS - 1)


def test_attention_biases_match_numpy():
  cfg = _cfg(num_kv_heads=2, use_bias=True)
  attn = attention.Attention(cfg, rotary_positions=False, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  for b in (attn.query_bias, attn.key_bias, attn.value_bias, attn.out_bias):
    b[...] = jnp.asarray(rng.normal(size=b[...].shape), jnp.float32)  # Zero at init.
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  mask = _random_mask(rng, 2, 5, 5)
  got = attn(jnp.asarray(x), jnp.asarray(x), jnp.asarray(mask))
  biases = [_np(b) for b in (attn.query_bias, attn.key_bias, attn.value_bias, attn.out_bias)]
  want = np_attention(x, x, mask, _np(attn.query), _np(attn.key), _np(attn.value),
                      _np(attn.out), biases=biases)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_attention_masked_keys_are_ignored():
  attn = attention.Attention(_cfg(), rotary_positions=False, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  x_q = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
  x_kv = rng.normal(size=(1, 6, 32)).astype(np.float32)
  mask = np.zeros((1, 1, 3, 6), bool)
  mask[..., :4] = True
  a = attn(x_q, jnp.asarray(x_kv), jnp.asarray(mask))
  x_kv[:, 4:] = 100 * rng.normal(size=(1, 2, 32))
  b = attn(x_q, jnp.asarray(x_kv), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads):
  gqa = attention.Attention(_cfg(num_kv_heads=num_kv_heads), rotary_positions=True,
                            rngs=nnx.Rngs(0))
  mha = attention.Attention(_cfg(num_kv_heads=4), rotary_positions=True, rngs=nnx.Rngs(1))
  g = 4 // num_kv_heads
  mha.query[...] = gqa.query[...]
  mha.out[...] = gqa.out[...]
  mha.key[...] = jnp.repeat(gqa.key[...], g, axis=1)
  mha.value[...] = jnp.repeat(gqa.value[...], g, axis=1)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  pos = transformer.default_positions(jnp.ones((2, 6), jnp.int32))
  mask = attention.causal_mask(pos, pos)
  np.testing.assert_allclose(np.asarray(gqa(x, x, mask, pos, pos)),
                             np.asarray(mha(x, x, mask, pos, pos)), rtol=1e-5, atol=1e-6)


def test_attention_rejects_indivisible_kv_heads():
  with pytest.raises(ValueError, match="multiple"):
    attention.Attention(_cfg(num_kv_heads=3), rotary_positions=False, rngs=nnx.Rngs(0))


def test_causal_and_padding_masks_match_numpy():
  pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]], np.int32)
  want = pos[:, None, None, :] <= pos[:, None, :, None]
  np.testing.assert_array_equal(np.asarray(attention.causal_mask(jnp.asarray(pos),
                                                                 jnp.asarray(pos))), want)
  np.testing.assert_array_equal(want[0, 0], np.tril(np.ones((4, 4), bool)))
  qv = np.array([[True, True, False]])
  kv = np.array([[True, False, True, True]])
  got = np.asarray(attention.padding_mask(jnp.asarray(qv), jnp.asarray(kv)))
  assert got.shape == (1, 1, 3, 4)
  np.testing.assert_array_equal(got[0, 0], np.outer(qv[0], kv[0]))


# --------------------------------------------------------------------------
# Rotary
# --------------------------------------------------------------------------


def test_rotary_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
  pos = np.stack([np.arange(7), 11 + 5 * np.arange(7)]).astype(np.int32)
  got = np.asarray(attention.rotary(jnp.asarray(x), jnp.asarray(pos)))
  np.testing.assert_allclose(got, np_rotary(x, pos), rtol=1e-4, atol=1e-5)
  # Position 0 is the identity; rotation preserves norms.
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)


@pytest.mark.parametrize("shift", [1, 7, 100])
def test_rotary_dot_product_depends_only_on_relative_position(shift):
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)

  def dot(i, j):
    rq = attention.rotary(q, jnp.full((1, 1), i, jnp.int32))
    rk = attention.rotary(k, jnp.full((1, 1), j, jnp.int32))
    return float(jnp.sum(rq * rk))

  for i, j in [(0, 0), (3, 1), (1, 3), (5, 12)]:
    assert dot(i + shift, j + shift) == pytest.approx(dot(i, j), rel=1e-4, abs=1e-4)
  # ...and does depend on the relative offset.
  assert abs(dot(0, 3) - dot(0, 0)) > 1e-2
