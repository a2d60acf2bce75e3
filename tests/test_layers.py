"""Tests of bigjax.models.layers' building blocks: Norm (LayerNorm and
RMSNorm, and layers.normalize's written-out backward pass), the MLP (gated or not,
with biases), the parameter initialisers (normal, xavier, lecun, embedding tables
and depth-scaled residual kernels) and dropout, down to the keys a whole model's
dropout draws. The references are the formulas written out in numpy (autodiff of
the plain formula for the norm's backward pass) and the initialisers' variances.
Attention and rotary: tests/test_attention_layer.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import attention, layers, transformer
from tests.layer_helpers import _cfg, _np


# --------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------

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
  attn = attention.Attention(cfg, rotary_positions=False, rngs=nnx.Rngs(1))
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
