"""Tests of bigjax.data.tokenizer, the byte-level tokenizer: every byte value is
token byte + 3 (after PAD, BOS and EOS), any bytes survive a round trip, text and
command-line arguments encode to their utf-8 (or given) bytes, and MASK_ID extends
the vocabulary for masked LM. The reference is the bytes themselves, written out by
hand; the eval's bits per byte divide by the text's bytes, checked against a sum of
random per-token losses."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from bigjax import tasks
from bigjax.data import tokenizer


def test_tokenizer_round_trip():
  text = "def f(x):\n  return 'é€😀'\n"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tokenizer.VOCAB_SIZE
  assert tokenizer.decode(ids) == text
  raw = bytes(range(256))  # Not valid utf-8; every byte value once.
  np.testing.assert_array_equal(tokenizer.encode(raw), np.arange(256) + 3)
  assert tokenizer.decode(np.r_[tokenizer.BOS_ID, tokenizer.encode("ab"),
                                tokenizer.EOS_ID, tokenizer.PAD_ID]) == "ab"
  assert tokenizer.decode(tokenizer.encode(b"\xff")) == "\ufffd"


def test_tokenizer_keeps_any_bytes():
  raw = b"\xff\xfe\x80abc"  # Not utf-8.
  ids = tokenizer.encode(raw)
  assert ids.tolist() == [0xff + 3, 0xfe + 3, 0x80 + 3, ord("a") + 3, ord("b") + 3,
                          ord("c") + 3]
  assert tokenizer.decode_bytes(ids) == raw
  assert tokenizer.decode_bytes(np.r_[tokenizer.BOS_ID, ids, tokenizer.MASK_ID]) == raw
  assert tokenizer.decode(ids) == "\ufffd\ufffd\ufffdabc"  # decode's str: one U+FFFD a byte.
  text = "é€😀"
  assert tokenizer.decode_bytes(tokenizer.encode(text)) == text.encode("utf-8")


def test_tokenizer_encodes_command_line_bytes_as_given():
  # A command-line argument holding a byte that is not utf-8 (latin-1 "café"):
  # Python hands it over as the lone surrogate U+DCE9, which encodes to the byte.
  code = ("import sys; from bigjax.data import tokenizer; "
          "print(tokenizer.encode(sys.argv[1]).tolist())")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code, b"caf\xe9"], cwd=root,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  ids = ast.literal_eval(out.stdout)
  assert ids == [ord("c") + 3, ord("a") + 3, ord("f") + 3, 0xe9 + 3]
  assert tokenizer.decode_bytes(ids) == b"caf\xe9"
  assert tokenizer.encode("caf\udce9").tolist() == ids  # The same, in-process.


@pytest.mark.parametrize("value", [5, np.array([1, 2, 3]), None, [104, 105]])
def test_tokenizer_rejects_what_is_not_text(value):
  # bytes(5) would be five zero bytes, bytes(an int64 array) its raw memory.
  with pytest.raises(TypeError, match="str or bytes, got"):
    tokenizer.encode(value)


def test_tokenizer_mask_id():
  assert tokenizer.MASK_ID == tokenizer.VOCAB_SIZE == 259
  assert tokenizer.MLM_VOCAB_SIZE == tokenizer.MASK_ID + 1
  ids = np.r_[tokenizer.encode("a"), tokenizer.MASK_ID, tokenizer.encode("b")]
  assert tokenizer.decode(ids) == "ab"

def test_bits_per_byte_divide_by_the_bytes_of_the_text():
  """The eval loss covers every graded token, EOS included; bits per byte divide
  its sum by the text's bytes alone (as published byte-level figures do)."""
  docs = [b"def f():", b"x", b"return 1\n"]
  ids = np.concatenate([np.append(tokenizer.encode(d), tokenizer.EOS_ID) for d in docs])
  batch = {"targets": ids[None, :].astype(np.int32),
           "weights": np.ones((1, ids.size), np.float32)}
  nats = np.random.default_rng(0).uniform(0.1, 3.0, ids.size)
  task = tasks.get("lm")
  sums = {"loss_sum": nats.sum(), "weight_sum": float(ids.size), **task.eval_sums(batch)}
  summary = task.eval_summary(sums)
  text_bytes = sum(len(d) for d in docs)
  assert summary["eval_bits_per_byte"] == pytest.approx(nats.sum() / np.log(2) / text_bytes)
  assert summary["eval_loss"] == pytest.approx(nats.mean())
