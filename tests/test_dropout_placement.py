"""Where dropout falls, by architecture: T5's stacks drop out their final norm's
output (T5X's and HF's T5Stack: final_layer_norm, then dropout); GPT-2's decoder
leaves it whole (HF's ln_f has none after it). Inverted dropout zeroes a fraction
`rate` of the entries it touches; a stack's output is otherwise almost never 0.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import transformer

RATE = 0.5
TINY = dict(vocab_size=64, num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, max_len=16,
            dropout_rate=RATE)


def _zero_fraction(x) -> float:
  return float(jnp.mean(x == 0))


def _tokens(seed):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 64, (8, 16)), jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_t5_stacks_drop_out_their_final_norm_output(scan):
  model = transformer.build(transformer.TransformerConfig(
      kind="encdec", norm="rmsnorm", position="relative", scan_layers=scan, **TINY),
      rngs=nnx.Rngs(0))
  src, tgt = _tokens(1), _tokens(2)
  encoded = model.encode(src, jax.random.key(3))
  assert abs(_zero_fraction(encoded) - RATE) < 0.03
  decoded = model.decode_features(encoded, src, tgt, rng=jax.random.key(4))
  assert abs(_zero_fraction(decoded) - RATE) < 0.03
  # Evaluation (no key): nothing dropped.
  assert _zero_fraction(model.encode(src)) < 0.01


def test_gpt2_decoder_keeps_its_final_norm_output_whole():
  model = transformer.build(transformer.TransformerConfig(
      kind="decoder", position="learned", **TINY), rngs=nnx.Rngs(0))
  assert _zero_fraction(model.features(_tokens(1), rng=jax.random.key(3))) < 0.01


def _dropout_sites(cfg, call):
  """(shape, rate) of every dropout the model applies in training mode."""
  from bigjax.models import layers
  sites, real = [], layers.dropout

  def record(x, rate, rng):
    if rng is not None and rate > 0:
      sites.append((tuple(x.shape), rate))
    return real(x, rate, rng)

  layers.dropout = record
  try:
    call(transformer.build(cfg, rngs=nnx.Rngs(0)))
  finally:
    layers.dropout = real
  return sites


@pytest.mark.parametrize("hidden", [False, True])
def test_the_mlp_hidden_activations_are_dropped_only_where_the_architecture_does(hidden):
  """HF's GPT2MLP (and BertIntermediate) drop out no hidden activation; T5's MLP
  block (T5DenseGatedActDense) does. Per GPT-2 block: the residual branches of
  attention and MLP, plus the embeddings once (attention probabilities go through
  attention_core, not layers.dropout)."""
  cfg = transformer.TransformerConfig(kind="decoder", position="learned",
                                      mlp_hidden_dropout=hidden, **TINY)
  tokens = _tokens(1)
  sites = _dropout_sites(cfg, lambda m: m.features(tokens, rng=jax.random.key(3)))
  hidden_width = [s for s in sites if s[0][-1] == TINY["mlp_dim"]]
  assert len(hidden_width) == (TINY["num_layers"] if hidden else 0), sites
  assert len(sites) - len(hidden_width) == 1 + 2 * TINY["num_layers"], sites


def test_only_t5_drops_out_its_mlp_hidden_activations():
  from configs import bert, gpt2, t5
  assert t5.get_config().model.mlp_hidden_dropout
  assert not gpt2.get_config().model.mlp_hidden_dropout
  assert not bert.get_config().model.mlp_hidden_dropout
