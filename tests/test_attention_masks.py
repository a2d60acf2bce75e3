"""Attention masking in the Transformer stacks: causality, padding, bidirectionality.

Each property is checked on whole models by comparing outputs of two inputs
that differ only where the mask says the output must not look.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import transformer

VOCAB = 50


def _model(kind="decoder", position="learned", **kw):
  # A fairly large init scale so that masked-out tokens would move the outputs a lot.
  args = dict(kind=kind, vocab_size=VOCAB, num_layers=2, emb_dim=32, num_heads=4,
              mlp_dim=64, max_len=32, position=position, init_scale=0.2)
  return transformer.build(transformer.TransformerConfig(**{**args, **kw}), nnx.Rngs(0))


def _tokens(seed, shape):
  return np.random.default_rng(seed).integers(1, VOCAB, shape).astype(np.int32)


# Jitted: one compile per shape is several times faster than eager op-by-op.
_call = nnx.jit(lambda model, *tokens: model(*tokens))
_call_positions = nnx.jit(lambda model, tokens, positions: model(tokens, positions=positions))
_decode = nnx.jit(lambda model, encoded, enc, dec: model.decode(encoded, enc, dec))


def _run(model, *tokens):
  return np.asarray(_call(model, *(jnp.asarray(t) for t in tokens)))


def _pad(tokens, length):
  out = np.zeros((tokens.shape[0], length), np.int32)
  out[:, :tokens.shape[1]] = tokens
  return out


POSITIONS = ["learned", "rotary", "relative"]


# --------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("num_kv_heads", [0, 2])
def test_decoder_is_causal(position, num_kv_heads):
  model = _model(position=position, num_kv_heads=num_kv_heads)
  a = _tokens(0, (2, 12))
  base = _run(model, a)
  for t in (0, 4, 10):
    b = a.copy()
    b[:, t + 1:] = _tokens(t + 1, (2, 12 - t - 1))
    assert (b[:, t + 1:] != a[:, t + 1:]).any()
    out = _run(model, b)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)
    # Sanity: the changed suffix does change the later outputs.
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_is_causal_with_explicit_positions(position):
  model = _model(position=position)
  a = _tokens(1, (2, 10))
  pos = jnp.asarray(np.stack([np.arange(10), np.arange(10) + 7]).astype(np.int32))
  base = np.asarray(_call_positions(model, jnp.asarray(a), pos))
  b = a.copy()
  b[:, 6:] = _tokens(2, (2, 4))
  out = np.asarray(_call_positions(model, jnp.asarray(b), pos))
  np.testing.assert_allclose(out[:, :6], base[:, :6], rtol=1e-5, atol=1e-5)
  assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-3


def test_encdec_decoder_is_causal():
  model = _model(kind="encdec")
  enc = _tokens(3, (2, 9))
  dec = _tokens(4, (2, 8))
  base = _run(model, enc, dec)
  dec2 = dec.copy()
  dec2[:, 5:] = _tokens(5, (2, 3))
  out = _run(model, enc, dec2)
  np.testing.assert_allclose(out[:, :5], base[:, :5], rtol=1e-5, atol=1e-5)
  assert np.abs(out[:, 5:] - base[:, 5:]).max() > 1e-3


# --------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_right_padding_does_not_leak(position):
  model = _model(position=position)
  lengths = [8, 5, 11]
  seqs = [_tokens(10 + i, (1, n)) for i, n in enumerate(lengths)]
  padded = np.concatenate([_pad(s, 14) for s in seqs])
  out = _run(model, padded)
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    np.testing.assert_allclose(out[i, :n], _run(model, s)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_left_padding_keys_are_masked(position):
  """Right padding is hidden by causality alone; left padding needs the pad-key mask."""
  model = _model(position=position)
  lengths = [9, 6]
  seqs = [_tokens(15 + i, (1, n)) for i, n in enumerate(lengths)]
  width = 12
  padded = np.zeros((2, width), np.int32)
  positions = np.zeros((2, width), np.int32)
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    padded[i, width - n:] = s[0]
    positions[i, width - n:] = np.arange(n)
  out = np.asarray(_call_positions(model, jnp.asarray(padded), jnp.asarray(positions)))
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    np.testing.assert_allclose(out[i, width - n:], _run(model, s)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_padding_keys_are_masked(position):
  model = _model(kind="encoder", position=position)
  lengths = [7, 4, 10]
  seqs = [_tokens(20 + i, (1, n)) for i, n in enumerate(lengths)]
  padded = np.concatenate([_pad(s, 12) for s in seqs])
  out = _run(model, padded)
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    np.testing.assert_allclose(out[i, :n], _run(model, s)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_encdec_encoder_padding_does_not_leak(position):
  model = _model(kind="encdec", position=position)
  enc = _tokens(30, (2, 7))
  enc[1, 5:] = 0  # second row already padded
  dec = _tokens(31, (2, 6))
  base = _run(model, enc, dec)
  for extra in (1, 5):
    out = _run(model, _pad(enc, 7 + extra), dec)
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)
  # Sanity: a real (non-padding) token appended does change the decoder output.
  more = np.concatenate([enc, np.full((2, 1), 3, np.int32)], axis=1)
  assert np.abs(_run(model, more, dec) - base).max() > 1e-3


def test_encdec_cross_attention_ignores_padded_encoder_values():
  """Padded encoder positions may hold any value; the decoder must not read them."""
  model = _model(kind="encdec")
  enc = _pad(_tokens(32, (2, 5)), 9)
  dec = jnp.asarray(_tokens(33, (2, 6)))
  encoded = model.encode(jnp.asarray(enc))
  base = np.asarray(_decode(model, encoded, jnp.asarray(enc), dec))
  noise = 100.0 * np.random.default_rng(34).normal(size=encoded.shape).astype(np.float32)
  noise[:, :5] = 0
  out = np.asarray(_decode(model, encoded + noise, jnp.asarray(enc), dec))
  np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Bidirectionality
# --------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_is_bidirectional(position):
  model = _model(kind="encoder", position=position)
  a = _tokens(40, (2, 10))
  b = a.copy()
  b[:, -1] = (a[:, -1] % (VOCAB - 1)) + 1  # a different non-padding token
  assert (b[:, -1] != a[:, -1]).all()
  oa, ob = _run(model, a), _run(model, b)
  assert (np.abs(oa[:, 0] - ob[:, 0]).max(axis=-1) > 1e-3).all()


def test_encdec_decoder_sees_whole_encoder_input():
  model = _model(kind="encdec")
  enc = _tokens(41, (2, 8))
  dec = _tokens(42, (2, 5))
  enc2 = enc.copy()
  enc2[:, -1] = (enc[:, -1] % (VOCAB - 1)) + 1
  oa, ob = _run(model, enc, dec), _run(model, enc2, dec)
  # Even the first decoder position reads the last encoder token.
  assert (np.abs(oa[:, 0] - ob[:, 0]).max(axis=-1) > 1e-3).all()


def test_the_models_mask_the_tokenizers_padding_id():
  from bigjax.data import tokenizer
  assert transformer.PAD_ID == tokenizer.PAD_ID


def test_more_tokens_than_learned_positions_is_an_error_not_nan():
  """Rows past the position table read as NaN (jnp.take), and attention spread
  them to every position, masked or not; HF's GPT-2 raises an IndexError."""
  with pytest.raises(ValueError, match="33 tokens exceed the model's model.max_len=32"):
    _model()(jnp.ones((1, 33), jnp.int32))
