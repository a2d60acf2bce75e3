"""Tests of whole-model options of bigjax.models.transformer: untied embeddings
(a separate logits kernel), bfloat16 compute (float32 parameters and logits) and
rematerialisation. The reference is the same model with the option off: the tied
parameter count, float32 logits, and the plain forward pass and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import transformer


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
