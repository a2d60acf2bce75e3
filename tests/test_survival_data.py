"""Bad data through the training entry points: a clear DataError before anything
compiles (never a hang), and non-UTF-8 text trained on as the bytes it is."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax import config as config_lib, steps, train
from bigjax.data import pipeline, tokenizer
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ODD = b"\xff\xfe\xfd\xc3("  # Not UTF-8: bytes 253-255 never occur in UTF-8 text.


class BigjaxOddBytes(tfds.core.GeneratorBasedBuilder):
  """Texts that are not UTF-8; a 'short' split smaller than one batch."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # See corpora.StdlibPy.

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "size": tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(60, 100),
            "validation": self._generate_examples(30, 100),
            "short": self._generate_examples(2, 10)}

  def _generate_examples(self, n, size):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"text": _ODD + rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                "size": size}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("bad_data"))
  BigjaxOddBytes(data_dir=d, file_format="array_record").download_and_prepare()
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, d)
  return d


@pytest.fixture
def no_compile(monkeypatch):
  for name in ("create_state", "make_train_step", "make_eval_step"):
    monkeypatch.setattr(steps, name, lambda *a, **k: pytest.fail("compiled something"))


@pytest.mark.parametrize("data, message", [
    (dict(dataset="no_such_dataset"), "Dataset 'no_such_dataset' is not prepared"),
    (dict(train_split="test"), "Unknown split 'test' of dataset 'stdlib_py'"),
    (dict(eval_split="valid"), "Unknown split 'valid' of dataset 'stdlib_py'"),
    (dict(text_key="content"), "has no feature 'content'"),
    (dict(dataset="bigjax_odd_bytes", text_key="size"),  # Not its zeros: an error.
     r"Feature 'size' of dataset 'bigjax_odd_bytes' holds int, not text; its text "
     r"features: \['text'\]"),
    (dict(dataset="bigjax_odd_bytes", train_split="short"),
     r"Split 'short' of 'bigjax_odd_bytes' has \d+ tokens, fewer than one batch"),
    (dict(dataset="bigjax_odd_bytes", eval_split="short"),
     r"Split 'short' of 'bigjax_odd_bytes' has \d+ tokens, fewer than one batch"),
])
def test_bad_data_fails_clearly_before_compiling(tmp_path, data_dir, no_compile, data,
                                                 message):
  config = lm.get_config("runlocal")
  config.data.update(data_dir=data_dir, **data)
  with pytest.raises(config_lib.DataError, match=message) as e:
    train.run(config, str(tmp_path))
  assert str(e.value).startswith("config.data: ")
  assert not os.path.exists(tmp_path / "checkpoints")


def test_tfrecord_dataset_fails_clearly_before_compiling(tmp_path, no_compile):
  """`tfds build` writes tfrecord by default, which has no random access. Writing
  tfrecord needs TensorFlow, so the dataset's metadata is made to say tfrecord."""
  d = str(tmp_path / "data")
  builder = BigjaxOddBytes(data_dir=d, file_format="array_record")
  builder.download_and_prepare()
  info_path = os.path.join(builder.data_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  assert info["fileFormat"] == "array_record"
  with open(info_path, "w") as f:
    json.dump({**info, "fileFormat": "tfrecord"}, f)
  config = lm.get_config("runlocal")
  config.data.update(data_dir=d, dataset="bigjax_odd_bytes")
  with pytest.raises(config_lib.DataError, match=(
      "Dataset 'bigjax_odd_bytes' in .* is prepared in the tfrecord file format, which "
      "cannot be read at random.*--file_format=array_record")):
    train.run(config, str(tmp_path / "run"))


def test_empty_split_fails_clearly_before_compiling(tmp_path, no_compile):
  config = lm.get_config("runlocal")
  config.data.update(dataset="lm1b", data_dir=str(tmp_path / "data"))
  with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(config_lib.DataError, match="Split 'train' of dataset 'lm1b' is empty"):
      train.run(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_cli_reports_bad_data_without_a_traceback(tmp_path, data_dir):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}",
         "--config.data.dataset=bigjax_odd_bytes", "--config.data.train_split=short"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert "Invalid config: config.data: Split 'short' of 'bigjax_odd_bytes' has" in r.stderr
  assert "Traceback" not in r.stderr


def test_non_utf8_bytes_are_tokens(data_dir):
  tokens = pipeline.token_array("bigjax_odd_bytes", "train", data_dir)
  docs = np.split(np.asarray(tokens), np.flatnonzero(tokens == tokenizer.EOS_ID) + 1)[:-1]
  assert len(docs) == 60
  for doc in docs:  # Every byte is its own id, 253-255 included: never PAD/BOS/EOS.
    np.testing.assert_array_equal(doc[:len(_ODD)], np.frombuffer(_ODD, np.uint8).astype(int) + 3)
    assert doc[:-1].min() >= tokenizer.OFFSET and doc[-1] == tokenizer.EOS_ID
  assert tokenizer.decode(doc[:3]) == "\ufffd" * 3  # Decoding replaces, never raises.


@pytest.mark.slow
def test_non_utf8_corpus_trains_end_to_end(tmp_path, data_dir):
  config = lm.get_config("runlocal")
  config.data.update(dataset="bigjax_odd_bytes", data_dir=data_dir)
  config.update(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, eval_batches=1)
  result = train.run(config, str(tmp_path))
  assert int(result.state.step) == 2 and np.isfinite(result.eval_metrics["eval_loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
