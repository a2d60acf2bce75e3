"""Tests of the masked-LM batches (tasks.masked_examples through
pipeline.LMBatches and pipeline.eval_batches) on random byte tokens: the batch
layout, BERT's masking statistics (mask_rate of the non-special tokens chosen;
of those 80% MASK, 10% random, 10% kept), at least one target per row,
determinism with fresh masks each epoch, fixed eval batches, and mask-rate
validation. The reference is the unmasked token array itself."""
import numpy as np
import pytest

from bigjax import tasks
from bigjax.data import pipeline, tokenizer
from tests.batch_helpers import EXAMPLES, _assert_batches_equal, _lm


def _mlm_tokens(n=20000, seed=0):
  """Random bytes with ~1 in 10 tokens EOS and a few BOS: specials to avoid."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(tokenizer.OFFSET, tokenizer.VOCAB_SIZE, n)
  toks[rng.random(n) < 0.1] = tokenizer.EOS_ID
  toks[rng.random(n) < 0.01] = tokenizer.BOS_ID
  return toks.astype(np.uint16)


def _mlm(tokens, mask_rate=0.15, **kw):
  return _lm(tokens, **{"examples": tasks.masked_examples(mask_rate), "seq_len": 64, **kw})


def test_mlm_batch_layout():
  toks = _mlm_tokens()
  x = _mlm(toks, shuffle=False).batch(1)
  assert {k: (v.shape, v.dtype) for k, v in x.items()} == {
      "inputs": ((8, 64), np.int32), "targets": ((8, 64), np.int32),
      "weights": ((8, 64), np.float32)}
  # Row r of step 1 is chunk 8 + r, without the one-token overlap of "lm".
  np.testing.assert_array_equal(x["targets"], toks[8 * 64:16 * 64].reshape(8, 64))
  kept = x["weights"] == 0
  np.testing.assert_array_equal(x["inputs"][kept], x["targets"][kept])
  assert set(np.unique(x["weights"])) == {0.0, 1.0}


def test_mlm_mask_statistics():
  toks = _mlm_tokens()
  b = _mlm(toks, mask_rate=0.2)
  xs = [b.batch(s) for s in range(20)]  # 10240 positions, ~9000 eligible.
  inputs, targets, weights = (np.concatenate([x[k] for x in xs])
                              for k in ("inputs", "targets", "weights"))
  kept = weights == 0
  np.testing.assert_array_equal(inputs[kept], targets[kept])
  special = targets < tokenizer.OFFSET
  assert special.sum() > 500 and not weights[special].any()  # EOS/BOS never.
  chosen = weights == 1
  assert chosen[~special].mean() == pytest.approx(0.2, abs=0.02)
  masked = inputs[chosen] == tokenizer.MASK_ID
  same = inputs[chosen] == targets[chosen]
  swapped = ~masked & ~same
  assert masked.mean() == pytest.approx(0.8, abs=0.04)
  assert same.mean() == pytest.approx(0.1, abs=0.03)  # (+1/256: random = original)
  assert swapped.mean() == pytest.approx(0.1, abs=0.03)
  rand = inputs[chosen][swapped]
  assert rand.min() >= tokenizer.OFFSET and rand.max() < tokenizer.VOCAB_SIZE
  assert (inputs[~chosen] != tokenizer.MASK_ID).all()


def test_mlm_every_row_has_a_target():
  # At mask_rate 0.01 most 16-token rows would draw no position at all.
  toks = _mlm_tokens()
  b = _mlm(toks, seq_len=16, mask_rate=0.01)
  w = np.concatenate([b.batch(s)["weights"] for s in range(30)])
  assert (w.sum(1) >= 1).all() and (w.sum(1) == 1).mean() > 0.5
  # A chunk of only specials has nothing to predict: zero weights, no error.
  toks[:16] = tokenizer.EOS_ID
  x = _mlm(toks, seq_len=16, shuffle=False).batch(0)
  assert not x["weights"][0].any() and (x["weights"][1:].sum(1) >= 1).all()


def test_mlm_deterministic_and_remasked_each_epoch():
  toks = _mlm_tokens()
  b = _mlm(toks)
  for step in (0, 5):
    _assert_batches_equal(b.batch(step), _mlm(toks).batch(step))
  it = b.iterate(3)
  for step in range(3, 6):
    _assert_batches_equal(next(it), b.batch(step))
  assert not np.array_equal(b.batch(0)["weights"], _mlm(toks, seed=1).batch(0)["weights"])
  # Unshuffled, step s and s + one epoch hold the same chunks, masked afresh.
  short = toks[:8 * 64 * 3 + 1]  # 24 chunks: 3 steps per epoch.
  u = _mlm(short, shuffle=False)
  a, c = u.batch(1), u.batch(4)
  np.testing.assert_array_equal(a["targets"], c["targets"])
  assert not np.array_equal(a["weights"], c["weights"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_mlm_eval_batches_fixed():
  toks = _mlm_tokens()
  kw = dict(global_batch_size=8, seq_len=64, num_batches=3, examples=EXAMPLES["mlm"])
  ev = pipeline.eval_batches(toks, **kw)
  assert len(ev) == 3
  for x, y in zip(ev, pipeline.eval_batches(toks, **kw)):
    _assert_batches_equal(x, y)
  assert not np.array_equal(ev[0]["weights"], ev[1]["weights"])
  np.testing.assert_array_equal(ev[2]["targets"], toks[16 * 64:24 * 64].reshape(8, 64))
  parts = [pipeline.eval_batches(toks, process_index=p, process_count=2, **kw)
           for p in range(2)]
  _assert_batches_equal({k: np.concatenate([parts[0][1][k], parts[1][1][k]])
                         for k in ev[1]}, ev[1])


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, float("nan")])
def test_mlm_bad_mask_rate(rate):
  with pytest.raises(ValueError, match=r"config\.data\.mask_rate"):
    tasks.masked_examples(rate)
