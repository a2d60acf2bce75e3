"""A freshly initialised model of every shipped config predicts near-uniformly.

Its logits have an O(1) spread and its loss on targets independent of the input
is ln(classes) plus about half the logits' variance (what Gaussian logits of that
spread give). Embeddings initialised for one convention but scaled for another
(N(0, 0.02^2) tables whose tied logits were multiplied by emb_dim^-0.5) gave
logits of std ~0.02: a model that spends its first thousand steps growing its
embeddings instead of learning.
"""
import importlib
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax import steps

TOKEN_CONFIGS = [
    ("lm", None), ("lm", "runlocal"), ("lm", "demo"),
    ("lm_moe", None), ("lm_moe", "runlocal"), ("lm_moe", "demo"), ("lm_moe", "encdec"),
    ("gpt2", None), ("gpt2", "demo"), ("t5", None), ("t5", "demo"),
    ("bert", None), ("bert", "runlocal"),
]
EXAMPLE_CONFIGS = [  # (config, arg, one example's feature shape)
    ("mlp", "variant=deep", (64,)), ("mlp", "variant=binary", (30,)),
    ("cnn", None, (8, 8, 1)),
]


def _config(name, arg):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _loss_and_spread(logits, targets):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  loss = (lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).mean()
  return loss, logits.std(-1).mean()


def _check(loss, spread, classes, min_spread=0.1):
  assert min_spread <= spread <= 1.5, f"logit std {spread:.3f} is not O(1)"
  expected = math.log(classes) + spread ** 2 / 2
  assert abs(loss - expected) < 0.25, (loss, expected, math.log(classes))


@pytest.mark.parametrize("name,arg", TOKEN_CONFIGS)
def test_fresh_token_model_predicts_uniformly(name, arg):
  config = _config(name, arg)
  model = steps.build_model(config, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  length = min(config.seq_len, 64)
  inputs = jnp.asarray(rng.integers(3, 259, (4, length)), jnp.int32)
  logits = model(inputs, inputs) if config.model.kind == "encdec" else model(inputs)
  # Targets drawn apart from the inputs: a model that echoes its input at init
  # (a tied unit-variance table) is not uniform, although its spread looks fine.
  targets = rng.integers(3, 259, inputs.shape)
  _check(*_loss_and_spread(logits, targets), config.model.vocab_size)


@pytest.mark.parametrize("name,arg,shape", EXAMPLE_CONFIGS)
def test_fresh_example_model_predicts_uniformly(name, arg, shape):
  config = _config(name, arg)
  model = steps.build_model(config, nnx.Rngs(0), example_shape=shape)
  rng = np.random.default_rng(0)
  logits = np.asarray(model(jnp.asarray(rng.standard_normal((256, *shape)), jnp.float32)))
  if config.task == "binary":  # One sigmoid logit: the two classes' logits are (0, z).
    logits = np.concatenate([np.zeros_like(logits), logits], -1)
  targets = rng.integers(0, logits.shape[-1], logits.shape[:-1])
  # Heads start at zero (exactly uniform), which a tied table must not (it would
  # never learn): no lower bound on the spread here.
  _check(*_loss_and_spread(logits, targets), logits.shape[-1], min_spread=0.0)


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_folding_the_query_scale_into_the_init_changes_no_function_at_init(kind):
  """model.fold_query_scale (T5) moves 1/sqrt(head_dim) from the forward pass into
  the query kernel's initialisation: from the same seed, the same logits."""
  from bigjax.models import transformer

  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 259, (2, 16)), jnp.int32)
  logits = {}
  for fold in (False, True):
    cfg = transformer.TransformerConfig(kind=kind, position="relative", init="lecun",
                                        fold_query_scale=fold)
    model = transformer.build(cfg, nnx.Rngs(0))
    logits[fold] = np.asarray(model(tokens) if kind == "decoder" else model(tokens, tokens))
  assert np.abs(logits[False]).max() > 0.05
  np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-6)
