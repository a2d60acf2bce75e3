"""Tests of bigjax.models.layers against plain numpy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import layers, transformer


def _cfg(**kw) -> layers.LayerConfig:
  args = dict(emb_dim=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=48,
              init_scale=0.3)
  return layers.LayerConfig(**{**args, **kw})


def _np(v) -> np.ndarray:
  return np.asarray(v[...], np.float64)


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


def np_norm(x, kind, scale, bias=None, eps=1e-6):
  x = np.asarray(x, np.float64)
  if kind == "layernorm":
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale + bias
  else:
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale
  return y


NP_ACT = {
    # jax.nn.gelu defaults to the tanh approximation.
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


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
  attn = layers.Attention(cfg, rotary_positions=rotary_positions, rngs=nnx.Rngs(0))
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
  assert [layers.causal_block_count(t) for t in (64, 100, 128, 192, 256, 4096)] == [
      1, 1, 2, 3, 4, 4]
  monkeypatch.setattr(layers, "CAUSAL_BLOCK_ROWS", 4)
  cfg = _cfg(num_kv_heads=num_kv_heads)
  causal = layers.Attention(cfg, rotary_positions=True, causal=True, rngs=nnx.Rngs(0))
  plain = layers.Attention(cfg, rotary_positions=True, rngs=nnx.Rngs(0))
  b, t = 2, 4 * layers.CAUSAL_BLOCKS
  rng = np.random.default_rng(5)
  x = rng.normal(size=(b, t, 32)).astype(np.float32)
  pos = np.stack([np.arange(t), np.arange(t) + 3]).astype(np.int32)
  mask = np.asarray(layers.causal_mask(jnp.asarray(pos), jnp.asarray(pos)))
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
  assert dots(causal) - dots(plain) == 2 * (layers.CAUSAL_BLOCKS - 1)


def test_attention_biases_match_numpy():
  cfg = _cfg(num_kv_heads=2, use_bias=True)
  attn = layers.Attention(cfg, rotary_positions=False, rngs=nnx.Rngs(0))
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
  attn = layers.Attention(_cfg(), rotary_positions=False, rngs=nnx.Rngs(1))
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
  gqa = layers.Attention(_cfg(num_kv_heads=num_kv_heads), rotary_positions=True,
                         rngs=nnx.Rngs(0))
  mha = layers.Attention(_cfg(num_kv_heads=4), rotary_positions=True, rngs=nnx.Rngs(1))
  g = 4 // num_kv_heads
  mha.query[...] = gqa.query[...]
  mha.out[...] = gqa.out[...]
  mha.key[...] = jnp.repeat(gqa.key[...], g, axis=1)
  mha.value[...] = jnp.repeat(gqa.value[...], g, axis=1)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  pos = transformer.default_positions(jnp.ones((2, 6), jnp.int32))
  mask = layers.causal_mask(pos, pos)
  np.testing.assert_allclose(np.asarray(gqa(x, x, mask, pos, pos)),
                             np.asarray(mha(x, x, mask, pos, pos)), rtol=1e-5, atol=1e-6)


def test_attention_rejects_indivisible_kv_heads():
  with pytest.raises(ValueError, match="multiple"):
    layers.Attention(_cfg(num_kv_heads=3), rotary_positions=False, rngs=nnx.Rngs(0))


def test_causal_and_padding_masks_match_numpy():
  pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]], np.int32)
  want = pos[:, None, None, :] <= pos[:, None, :, None]
  np.testing.assert_array_equal(np.asarray(layers.causal_mask(jnp.asarray(pos),
                                                              jnp.asarray(pos))), want)
  np.testing.assert_array_equal(want[0, 0], np.tril(np.ones((4, 4), bool)))
  qv = np.array([[True, True, False]])
  kv = np.array([[True, False, True, True]])
  got = np.asarray(layers.padding_mask(jnp.asarray(qv), jnp.asarray(kv)))
  assert got.shape == (1, 1, 3, 4)
  np.testing.assert_array_equal(got[0, 0], np.outer(qv[0], kv[0]))


# --------------------------------------------------------------------------
# Rotary
# --------------------------------------------------------------------------


def test_rotary_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
  pos = np.stack([np.arange(7), 11 + 5 * np.arange(7)]).astype(np.int32)
  got = np.asarray(layers.rotary(jnp.asarray(x), jnp.asarray(pos)))
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
    rq = layers.rotary(q, jnp.full((1, 1), i, jnp.int32))
    rk = layers.rotary(k, jnp.full((1, 1), j, jnp.int32))
    return float(jnp.sum(rq * rk))

  for i, j in [(0, 0), (3, 1), (1, 3), (5, 12)]:
    assert dot(i + shift, j + shift) == pytest.approx(dot(i, j), rel=1e-4, abs=1e-4)
  # ...and does depend on the relative offset.
  assert abs(dot(0, 3) - dot(0, 0)) > 1e-2


# --------------------------------------------------------------------------
# Norm and MLP
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind,eps", [("layernorm", 1e-6), ("rmsnorm", 1e-6),
                                      ("layernorm", 1e-5), ("rmsnorm", 1e-5)])
def test_norm_matches_numpy(kind, eps):
  cfg = _cfg(norm=kind, norm_eps=eps)
  norm = layers.Norm(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(5)
  scale = rng.normal(size=32).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  bias = None
  if kind == "layernorm":
    bias = rng.normal(size=32).astype(np.float32)
    norm.bias[...] = jnp.asarray(bias)
  else:
    assert norm.bias is None
  # Rows with variance ~1e-5, where the epsilon moves the output by ~30%.
  x = (3e-3 + 3e-3 * rng.normal(size=(2, 5, 32))).astype(np.float32)
  got = np.asarray(norm(jnp.asarray(x)))
  np.testing.assert_allclose(got, np_norm(x, kind, scale, bias, eps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("center,with_bias", [(True, True), (False, False), (True, False)])
def test_norm_backward_matches_autodiff_of_the_definition(center, with_bias):
  """layers.normalize's written-out backward pass against autodiff of the plain
  formula, in float64 (x, scale and bias gradients)."""
  def plain(x, scale, bias):
    centered = x - x.mean(-1, keepdims=True) if center else x
    y = centered / jnp.sqrt(jnp.mean(centered ** 2, -1, keepdims=True) + 1e-5) * scale
    return y if bias is None else y + bias
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    x, d_y = (jnp.asarray(rng.normal(size=(2, 3, 16))) for _ in range(2))
    scale = jnp.asarray(rng.normal(size=16))
    bias = jnp.asarray(rng.normal(size=16)) if with_bias else None
    got_y, got_vjp = jax.vjp(lambda *a: layers.normalize(*a, 1e-5, center), x, scale, bias)
    want_y, want_vjp = jax.vjp(plain, x, scale, bias)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-12)
    for got, want in zip(jax.tree.leaves(got_vjp(d_y)), jax.tree.leaves(want_vjp(d_y)),
                         strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_norm_rejects_unknown_kind():
  with pytest.raises(ValueError, match="norm"):
    layers.Norm(_cfg(norm="batchnorm"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("activation,gated,use_bias", [
    ("gelu", False, False), ("relu", False, False), ("silu", True, False),
    ("gelu", True, False), ("gelu", False, True), ("silu", True, True)])
def test_mlp_matches_numpy(activation, gated, use_bias):
  mlp = layers.MLP(_cfg(mlp_activation=activation, gated_mlp=gated, use_bias=use_bias),
                   rngs=nnx.Rngs(0))
  assert (mlp.wi_gate is not None) == gated
  rng = np.random.default_rng(6)
  biases = {}
  for name in ("wi_bias", "wi_gate_bias", "wo_bias"):
    b = getattr(mlp, name)
    if b is not None:  # Zero at init: make them count.
      b[...] = jnp.asarray(rng.normal(size=b[...].shape), jnp.float32)
    biases[name] = 0.0 if b is None else _np(b)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  act = NP_ACT[activation]
  h = x.astype(np.float64) @ _np(mlp.wi) + biases["wi_bias"]
  if gated:
    h = act(x.astype(np.float64) @ _np(mlp.wi_gate) + biases["wi_gate_bias"]) * h
  else:
    h = act(h)
  want = h @ _np(mlp.wo) + biases["wo_bias"]
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------


def test_normal_init_std_is_init_scale():
  cfg = _cfg(emb_dim=256, mlp_dim=1024, init="normal", init_scale=0.05)
  mlp = layers.MLP(cfg, rngs=nnx.Rngs(0))
  for w in (mlp.wi, mlp.wo):
    assert abs(np.std(_np(w)) / 0.05 - 1) < 0.05
    assert abs(np.mean(_np(w))) < 0.005


@pytest.mark.parametrize("embed_init,std,logit_factor", [
    ("normal", 0.3, 1.0), ("unit", 1.0, 256 ** -0.5)])
def test_embedding_init_and_tied_logit_factor_agree(embed_init, std, logit_factor):
  # GPT-2 draws its table with std 0.02 (here init_scale 0.3) and uses it for the
  # logits as it is; T5/PaLM draw N(0, 1) and multiply tied logits by d^-0.5.
  cfg = _cfg(emb_dim=256, embed_init=embed_init, init="lecun")
  for table in (layers.Embed(512, cfg, rngs=nnx.Rngs(2)).embedding,
                layers.PositionEmbed(512, cfg, rngs=nnx.Rngs(3)).embedding):
    assert abs(np.std(_np(table)) / std - 1) < 0.02
  assert layers.tied_logits_scale(cfg) == logit_factor


def test_residual_output_kernels_start_scaled_by_depth():
  # GPT-2: the kernels whose outputs are added to the residual stream (attention
  # out, MLP out) start at init_scale / sqrt(2 * num_layers); the others do not.
  def kernels(scale_residual_init):
    cfg = transformer.TransformerConfig(
        vocab_size=64, num_layers=8, emb_dim=128, num_heads=4, mlp_dim=512, max_len=16,
        init_scale=0.05, scale_residual_init=scale_residual_init)
    block = transformer.build(cfg, nnx.Rngs(0)).decoder.blocks[3]
    return {"out": block.attn.out, "wo": block.ffn.wo, "query": block.attn.query,
            "wi": block.ffn.wi}

  plain, scaled = kernels(False), kernels(True)
  for name in ("out", "wo", "query", "wi"):
    assert abs(np.std(_np(plain[name])) / 0.05 - 1) < 0.05
  for name, want in (("out", 0.05 / 4), ("wo", 0.05 / 4), ("query", 0.05), ("wi", 0.05)):
    assert abs(np.std(_np(scaled[name])) / want - 1) < 0.05, name


@pytest.mark.parametrize("init", ["xavier", "lecun"])
def test_variance_scaling_inits_match_formulas(init):
  e, m, h, d = 256, 1024, 8, 64
  cfg = _cfg(emb_dim=e, mlp_dim=m, num_heads=h, num_kv_heads=h, head_dim=d, init=init)

  def want_var(fan_in, fan_out):
    return 2.0 / (fan_in + fan_out) if init == "xavier" else 1.0 / fan_in

  mlp = layers.MLP(cfg, rngs=nnx.Rngs(0))
  attn = layers.Attention(cfg, rotary_positions=False, rngs=nnx.Rngs(1))
  cases = [
      (mlp.wi, e, m), (mlp.wo, m, e),
      # [embed, heads, head_dim]: fan-in embed, fan-out heads * head_dim.
      (attn.query, e, h * d), (attn.key, e, h * d), (attn.value, e, h * d),
      # [heads, head_dim, embed]: fan-in heads * head_dim.
      (attn.out, h * d, e),
  ]
  for w, fan_in, fan_out in cases:
    var = np.var(_np(w))
    assert abs(var / want_var(fan_in, fan_out) - 1) < 0.1, (w[...].shape, var)
  if init == "xavier":  # uniform on [-a, a], a = sqrt(3 var)
    a = math.sqrt(3 * want_var(e, m))
    assert np.abs(_np(mlp.wi)).max() <= a * (1 + 1e-6)
  else:  # truncated at 2 std
    assert np.abs(_np(mlp.wi)).max() <= 2.0 * 1.2 * math.sqrt(want_var(e, m))


def test_unknown_init_rejected():
  with pytest.raises(ValueError, match="init"):
    layers.MLP(_cfg(init="orthogonal"), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------


def test_dropout_identity_without_rng():
  x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 8)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(layers.dropout(x, 0.5, None)), np.asarray(x))
  np.testing.assert_array_equal(
      np.asarray(layers.dropout(x, 0.0, jax.random.PRNGKey(0))), np.asarray(x))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_fraction_and_scaling(rate):
  x = jnp.full((200_000,), 2.0, jnp.float32)
  y = np.asarray(layers.dropout(x, rate, jax.random.PRNGKey(1)))
  kept = y != 0
  assert abs(kept.mean() - (1 - rate)) < 0.01
  np.testing.assert_allclose(y[kept], 2.0 / (1 - rate), rtol=1e-6)
  # Mean is preserved in expectation.
  assert abs(y.mean() / 2.0 - 1) < 0.02
  # Same key, same mask; another key, another mask.
  np.testing.assert_array_equal(y, np.asarray(layers.dropout(x, rate, jax.random.PRNGKey(1))))
  assert (y != np.asarray(layers.dropout(x, rate, jax.random.PRNGKey(2)))).any()


@pytest.mark.parametrize("kind", ["decoder", "encoder", "encdec"])
def test_model_dropout_keys(kind):
  cfg = transformer.TransformerConfig(kind=kind, vocab_size=40, num_layers=1, emb_dim=32,
                                      num_heads=4, mlp_dim=64, max_len=16, dropout_rate=0.2)
  model = transformer.build(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(8).integers(1, 40, (2, 10)), jnp.int32)
  args = (tokens, tokens) if kind == "encdec" else (tokens,)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, a2, b = model(*args, rng=k1), model(*args, rng=k1), model(*args, rng=k2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  # rng=None is deterministic (no dropout) and differs from a dropped-out pass.
  d1, d2 = model(*args, rng=None), model(*args)
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
  assert np.abs(np.asarray(a) - np.asarray(d1)).max() > 1e-3


# --------------------------------------------------------------------------
# Model options
# --------------------------------------------------------------------------


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_untied_embeddings_have_separate_logits_kernel():
  base = dict(vocab_size=40, num_layers=1, emb_dim=32, num_heads=4, mlp_dim=64, max_len=16)
  tied = transformer.build(transformer.TransformerConfig(**base), nnx.Rngs(0))
  untied = transformer.build(transformer.TransformerConfig(**base, tie_embeddings=False),
                             nnx.Rngs(0))
  assert tied.embedder.logits_kernel is None
  kernel = untied.embedder.logits_kernel
  assert kernel[...].shape == (32, 40)
  n_tied = sum(p.size for p in _params(tied))
  n_untied = sum(p.size for p in _params(untied))
  assert n_untied - n_tied == 32 * 40
  tokens = jnp.asarray(np.random.default_rng(9).integers(1, 40, (2, 8)), jnp.int32)
  # The logits are the final hidden state times the separate kernel, not the table:
  # zeroing the kernel zeroes the logits; zeroing the embedding table does not.
  untied.embedder.tokens.embedding[...] = jnp.zeros_like(untied.embedder.tokens.embedding[...])
  assert np.abs(np.asarray(untied(tokens))).max() > 1e-3
  kernel[...] = jnp.zeros_like(kernel[...])
  np.testing.assert_array_equal(np.asarray(untied(tokens)), 0.0)


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_bfloat16_compute_keeps_float32_params_and_logits(kind):
  base = dict(kind=kind, vocab_size=40, num_layers=1, emb_dim=32, num_heads=4, mlp_dim=64,
              max_len=16, init_scale=0.1)
  m16 = transformer.build(transformer.TransformerConfig(**base, dtype="bfloat16"),
                          nnx.Rngs(0))
  m32 = transformer.build(transformer.TransformerConfig(**base), nnx.Rngs(0))
  for p in _params(m16):
    assert p.dtype == jnp.float32
  tokens = jnp.asarray(np.random.default_rng(10).integers(1, 40, (2, 8)), jnp.int32)
  args = (tokens, tokens) if kind == "encdec" else (tokens,)
  l16, l32 = m16(*args), m32(*args)
  assert l16.dtype == jnp.float32 and l32.dtype == jnp.float32
  # Same parameters, bf16 arithmetic: close but not bit-identical.
  l16, l32 = np.asarray(l16), np.asarray(l32)
  assert np.abs(l16 - l32).max() < 0.05 * np.abs(l32).max() + 1e-2
  assert not np.array_equal(l16, l32)



def test_remat_matches_plain_forward_and_gradients():
  # Checks argument and dropout-key plumbing through nnx.remat, and that the
  # recomputed backward pass gives the same gradients.
  base = dict(vocab_size=40, num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, max_len=16,
              init_scale=0.2, dropout_rate=0.1)
  tokens = jnp.asarray(np.random.default_rng(11).integers(1, 40, (2, 8)), jnp.int32)
  weights = jnp.asarray(np.random.default_rng(12).normal(size=(2, 8, 40)), jnp.float32)
  key = jax.random.PRNGKey(3)  # dropout on: both must draw the same masks
  outs, grads = [], []
  for policy in ("none", "full"):
    model = transformer.build(transformer.TransformerConfig(**base, remat_policy=policy),
                              nnx.Rngs(0))
    outs.append(np.asarray(model(tokens, rng=key)))
    g = nnx.grad(lambda m: jnp.sum(m(tokens, rng=key) * weights))(model)
    grads.append(jax.device_get(nnx.to_pure_dict(g)))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
  leaves = jax.tree_util.tree_leaves_with_path(grads[1])
  assert len(leaves) == len(jax.tree.leaves(grads[0])) > 10
  for (path, got), want in zip(leaves, jax.tree.leaves(grads[0])):
    scale = float(np.abs(want).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
