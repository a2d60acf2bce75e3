"""In bf16 compute the output logits are float32 products of the bf16 features and
vocabulary weights, not bf16 numbers cast up: rounding logits to bf16 (8 bits of
mantissa, ~0.03 at |logit| 10) before the softmax puts that error into the loss."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import transformer


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_bf16_logits_are_float32_products(tie_embeddings):
  cfg = transformer.TransformerConfig(vocab_size=97, emb_dim=64, dtype="bfloat16",
                                      tie_embeddings=tie_embeddings, embed_init="unit")
  model = transformer.build(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 16)), jnp.int32)
  features = model.features(tokens)
  assert features.dtype == jnp.bfloat16
  embedder = model.embedder
  if tie_embeddings:
    kernel = embedder.tokens.embedding[...].T
    features = features * embedder.tied_logits_scale
  else:
    kernel = embedder.logits_kernel[...]
  # The same bf16 operands, multiplied in float64 by numpy.
  want = (np.asarray(features, np.float32).astype(np.float64)
          @ np.asarray(kernel.astype(jnp.bfloat16), np.float32).astype(np.float64))
  got = np.asarray(model(tokens))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The tolerance has teeth: the same logits rounded to bf16 would fail it.
  rounded = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
  assert np.abs(rounded - want).max() > 10 * 1e-5 * np.abs(want).max()
