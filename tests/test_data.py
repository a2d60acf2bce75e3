"""Tests of bigjax.data's corpora, token caches and LM batching: the embedded
stdlib_py corpus's splits (disjoint, real Python) and other prepared or mocked
TFDS datasets; the token array cached on disk (equal to tokenising the texts by
hand, keyed by the documents or the prepared files, with its statistics); and
pipeline.LMBatches / eval_batches for the "lm" and "reverse" tasks, checked against
slices of the token array. The tokenizer and masked-LM batches have their own
files (tests/test_tokenizer.py, tests/test_mlm_batches.py)."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest
import grain
import tensorflow_datasets as tfds

from bigjax.data import corpora, pipeline, tokenizer
from tests.batch_helpers import EXAMPLES, _assert_batches_equal, _lm


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data dir with stdlib_py prepared once for the whole module."""
  d = str(tmp_path_factory.mktemp("tfds"))
  corpora.prepared_source("stdlib_py", "train", d)
  return d


@pytest.fixture(scope="module")
def tokens(data_dir):
  return pipeline.token_array("stdlib_py", "validation", data_dir)

# Corpora.

def test_stdlib_splits_disjoint_and_real_python(data_dir):
  train = corpora.prepared_source("stdlib_py", "train", data_dir)
  val = corpora.prepared_source("stdlib_py", "validation", data_dir)
  assert len(train) > 10 * len(val) > 0
  train_paths = {train[i]["path"] for i in range(len(train))}
  val_paths = {val[i]["path"] for i in range(len(val))}
  assert not train_paths & val_paths
  assert train_paths | val_paths == {p.encode() for p in corpora.stdlib_files()}
  for p in train_paths | val_paths:
    parts = p.decode().split(os.sep)
    assert not {"test", "tests", "site-packages", "__pycache__"} & set(parts)
  ex = train[0]
  assert isinstance(ex["text"], bytes)
  ast.parse(ex["text"])  # Real Python source.
  assert b"import" in b"".join(val[i]["text"] for i in range(len(val)))


def test_unknown_split(data_dir):
  with pytest.raises(ValueError, match=r"available splits: \['train', 'validation'\]"):
    corpora.prepared_source("stdlib_py", "test", data_dir)


def test_split_all_is_every_split_as_in_tfds(data_dir):
  sizes = {s: len(corpora.prepared_source("stdlib_py", s, data_dir))
           for s in ("all", "train", "validation")}
  assert sizes["all"] == sizes["train"] + sizes["validation"]


def test_prepare_race(tmp_path):
  # Two processes preparing the same data dir at once both succeed.
  code = ("import sys; from bigjax.data import corpora; "
          "print(len(corpora.prepared_source('stdlib_py', 'train', sys.argv[1])))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
  counts = [int(out.split()[-1]) for out, _ in outs]  # tfds also prints.
  assert counts[0] == counts[1] > 100


def test_unprepared_dataset_clear_error(tmp_path):
  for name in ("lm1b", "no_such_dataset_xyz"):
    with pytest.raises(ValueError, match="not prepared") as e:
      corpora.prepared_source(name, "train", str(tmp_path))
    for word in ("config.data.data_dir", "TFDS_DATA_DIR", "tfds build", "stdlib_py"):
      assert word in str(e.value)
  assert os.listdir(tmp_path) == []  # Nothing was downloaded or created.


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/some/dir")
  assert corpora.default_data_dir("") == corpora.default_data_dir(None) == "/some/dir"
  assert corpora.default_data_dir("/x") == "/x"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert corpora.default_data_dir(None) == os.path.expanduser("~/tensorflow_datasets")


def test_mock_lm1b(tmp_path):
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    src = corpora.prepared_source("lm1b", "train", str(tmp_path))
    assert len(src) == 20 and isinstance(src[0]["text"], bytes)
    toks = pipeline.token_array("lm1b", "train", str(tmp_path))
  assert (toks == tokenizer.EOS_ID).sum() == 20
  texts = b"".join(src[i]["text"] + b"\0" for i in range(20))
  np.testing.assert_array_equal(np.where(toks == 2, 0, toks.astype(int) - 3),
                                np.frombuffer(texts, np.uint8))


class BigjaxTinyText(tfds.core.GeneratorBasedBuilder):
  """A prepared non-stdlib dataset, read through the generic path."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # See corpora.StdlibPy.

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"line {i}"}


def test_prepared_other_dataset(tmp_path):
  BigjaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = corpora.prepared_source("bigjax_tiny_text", "test", str(tmp_path))
  assert sorted(src[i]["text"] for i in range(len(src))) == [b"line 0", b"line 1"]
  assert len(corpora.prepared_source("bigjax_tiny_text", "train[:60%]", str(tmp_path))) == 3
  with pytest.raises(ValueError, match="available splits"):
    corpora.prepared_source("bigjax_tiny_text", "validation", str(tmp_path))
  with pytest.raises(ValueError, match="no feature 'content'"):
    pipeline.token_array("bigjax_tiny_text", "train", str(tmp_path), text_key="content")
  toks = pipeline.token_array("bigjax_tiny_text", "train", str(tmp_path))
  assert (toks == tokenizer.EOS_ID).sum() == 5 and toks.size == 5 * 7


def test_empty_split(tmp_path):
  with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="Split 'train' of dataset 'lm1b' is empty"):
      pipeline.token_array("lm1b", "train", str(tmp_path))


# Token array.

def test_token_array_cache(data_dir, tokens):
  assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
  files = os.listdir(os.path.join(data_dir, "bigjax_tokens"))
  assert [f for f in files if f.startswith("stdlib_py-validation")] and not [
      f for f in files if not f.endswith((".npy", ".npy.stats.json", ".npy.lock"))]  # No temps.
  again = pipeline.token_array("stdlib_py", "validation", data_dir)
  np.testing.assert_array_equal(again, tokens)
  # A writer killed mid-way left its partial files: the next write removes them.
  path = again.filename
  stale = [f"{path}{pipeline.PARTIAL}killed.raw", f"{path}{pipeline.PARTIAL}killed.npy.tmp"]
  for f in stale:
    open(f, "wb").write(b"\0" * 1024)
  os.remove(path)
  np.testing.assert_array_equal(pipeline.token_array("stdlib_py", "validation", data_dir),
                                tokens)
  assert not [f for f in stale if os.path.exists(f)]
  # The same as tokenising the texts by hand.
  src = corpora.prepared_source("stdlib_py", "validation", data_dir)
  ref = np.concatenate([np.r_[tokenizer.encode(src[i]["text"]), tokenizer.EOS_ID]
                        for i in range(len(src))])
  np.testing.assert_array_equal(tokens, ref)


class _Docs(list):
  """A random-access source of {"text": bytes} examples, as prepared_source gives."""

  def __init__(self, *texts):
    super().__init__({"text": t} for t in texts)

  def __getitems__(self, keys):
    return [self[i] for i in keys]

  def files(self):
    return None  # As mocked data: nothing on disk, so every document is hashed.


def test_token_cache_key_changes_with_any_document():
  key = lambda *texts: pipeline._fingerprint(_Docs(*texts), "text")
  docs = [b"doc %d" % i for i in range(9)]
  assert key(*docs) == key(*docs)  # Stable: a rerun finds its cache.
  middle = docs[:4] + [b"doc X"] + docs[5:]  # Same count, same first and last three.
  assert key(*middle) != key(*docs)
  # Other documents, the same bytes joined: EOS goes elsewhere, so other tokens.
  assert key(b"ab", b"c") != key(b"a", b"bc")
  # Past one read block (pipeline._READ_BLOCK) too.
  many = [b"%d" % i for i in range(pipeline._READ_BLOCK + 10)]
  changed = many.copy()
  changed[pipeline._READ_BLOCK + 5] = b"changed"
  assert key(*many) != key(*changed)


def test_token_cache_key_of_a_prepared_split_follows_its_files(data_dir, monkeypatch):
  src = corpora.prepared_source("stdlib_py", "validation", data_dir)
  key = pipeline._fingerprint(src, "text")
  # Read from the files' metadata, not the documents: no pass over a large corpus
  # at every start.
  with monkeypatch.context() as m:
    m.setattr(type(src), "__getitems__", lambda *a: pytest.fail("documents read"))
    m.setattr(type(src), "__getitem__", lambda *a: pytest.fail("documents read"))
    assert pipeline._fingerprint(src, "text") == key
  # Preparing the dataset again writes its files anew: another key.
  path = src.files()[0][0]
  before = os.stat(path)
  try:
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 5 * 10**9))
    assert pipeline._fingerprint(src, "text") != key
  finally:
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert pipeline._fingerprint(src, "text") == key
  # Another range of the same files, another key.
  part = corpora.prepared_source("stdlib_py", "validation[:50%]", data_dir)
  assert pipeline._fingerprint(part, "text") != key


def test_token_stats_are_computed_once_with_the_cache(data_dir, tokens, monkeypatch):
  stats = pipeline.token_stats("stdlib_py", "validation", data_dir)
  assert stats["unigram_entropy_bits"] == pytest.approx(pipeline.unigram_entropy_bits(tokens))
  # Read back from the cache's side file: no second pass over the tokens.
  monkeypatch.setattr(pipeline, "unigram_entropy_bits", lambda t: pytest.fail("recomputed"))
  assert pipeline.token_stats("stdlib_py", "validation", data_dir) == stats


def test_unigram_entropy():
  toks = np.array([3, 3, 4, 5], np.uint16)  # p = 1/2, 1/4, 1/4 -> 1.5 bits.
  assert pipeline.unigram_entropy_bits(toks) == pytest.approx(1.5)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 259, 5000)
  _, counts = np.unique(toks, return_counts=True)
  p = counts / counts.sum()
  assert pipeline.unigram_entropy_bits(toks) == pytest.approx(-np.sum(p * np.log2(p)))
  assert pipeline.unigram_entropy_bits(np.full(7, 9)) == 0.0


# Batches.

def test_batch_deterministic_and_shifted(tokens):
  b = _lm(tokens)
  x = b.batch(3)
  assert {k: v.shape for k, v in x.items()} == {k: (8, 32) for k in x}
  assert x["inputs"].dtype == np.int32 and x["weights"].dtype == np.float32
  _assert_batches_equal(x, _lm(tokens).batch(3))
  assert not np.array_equal(x["inputs"], b.batch(4)["inputs"])
  assert not np.array_equal(x["inputs"], _lm(tokens, seed=1).batch(3)["inputs"])
  np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
  assert (x["weights"] == 1).all()
  # Each row is a contiguous stretch of the token array.
  row = x["inputs"][0]
  i = next(i for i in range(b.num_chunks)
           if np.array_equal(tokens[i * 32:i * 32 + 32], row))
  np.testing.assert_array_equal(tokens[i * 32 + 1:i * 32 + 33], x["targets"][0])


def test_no_shuffle_is_in_order(tokens):
  x = _lm(tokens, shuffle=False).batch(1)
  np.testing.assert_array_equal(x["inputs"][0], tokens[8 * 32:9 * 32])


@pytest.mark.parametrize("task", ["lm", "reverse", "mlm"])
def test_process_shards_tile_global_batch(tokens, task):
  for step in (0, 7):
    ref = _lm(tokens, task=task).batch(step)
    for p_count in (2, 4):
      parts = [_lm(tokens, task=task, process_index=p, process_count=p_count).batch(step)
               for p in range(p_count)]
      assert parts[0]["targets"].shape == (8 // p_count, 32)
      _assert_batches_equal({k: np.concatenate([q[k] for q in parts]) for k in ref}, ref)


def test_iterate_matches_batch(tokens):
  b = _lm(tokens, process_index=1, process_count=2)
  it = b.iterate(5)
  for step in range(5, 9):
    _assert_batches_equal(next(it), b.batch(step))


def test_epochs_cover_chunks_and_reshuffle(tokens):
  short = tokens[:8 * 32 * 3 + 1]  # Exactly 3 batches of chunks per epoch.
  b = _lm(short)
  assert b.num_chunks == 24
  first = lambda step: b.batch(step)["inputs"][:, 0]
  epoch0 = np.concatenate([first(s) for s in range(3)])
  epoch1 = np.concatenate([first(s) for s in range(3, 6)])
  starts = np.asarray(short[0:24 * 32:32])
  assert sorted(epoch0) == sorted(starts) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)


def test_neighbouring_seeds_do_not_share_epoch_orders(tokens):
  """grain shuffles epoch e with its seed + e: seeds passed through unmixed, seed
  s + 1 would replay seed s's orders one epoch late. Seed 0 keeps its order."""
  short = tokens[:8 * 32 * 3 + 1]  # 3 batches of chunks per epoch.
  orders = lambda seed: [tuple(np.concatenate([_lm(short, seed=seed).batch(3 * e + s)["inputs"][:, 0]
                                                for s in range(3)]))
                         for e in range(6)]
  by_seed = {seed: orders(seed) for seed in range(4)}
  shared = {(a, b, i, j) for a in by_seed for b in by_seed if a < b
            for i, x in enumerate(by_seed[a]) for j, y in enumerate(by_seed[b]) if x == y}
  assert not shared
  grain_seed0 = grain.MapDataset.range(24).shuffle(seed=0)
  assert list(by_seed[0][0]) == [int(short[32 * i]) for i in grain_seed0]


def test_reverse_task(tokens):
  x = _lm(tokens, task="reverse", shuffle=False).batch(0)
  src = np.asarray(tokens[:8 * 32 + 1], np.int64)
  for r in range(8):
    enc = src[r * 32:r * 32 + 32]
    tgt = enc[::-1]
    np.testing.assert_array_equal(x["encoder_inputs"][r], enc)
    np.testing.assert_array_equal(x["targets"][r], tgt)
    np.testing.assert_array_equal(x["decoder_inputs"][r], [1, *tgt[:-1]])
  assert (x["weights"] == 1).all() and x["targets"].dtype == np.int32


def test_eval_batches(tokens):
  kw = dict(global_batch_size=8, seq_len=32, examples=EXAMPLES["lm"])
  ev = pipeline.eval_batches(tokens, num_batches=3, **kw)
  assert len(ev) == 3
  _assert_batches_equal(ev[2], _lm(tokens, shuffle=False).batch(2))
  parts = [pipeline.eval_batches(tokens, num_batches=3, process_index=p,
                                 process_count=2, **kw) for p in range(2)]
  _assert_batches_equal({k: np.concatenate([parts[0][1][k], parts[1][1][k]])
                         for k in ev[1]}, ev[1])
  # Two whole global batches and one chunk more: evaluated whole, the third
  # batch's other 7 rows at weight 0, and as many batches on every process.
  short = tokens[:8 * 32 * 2 + 1 + 40]
  ev = pipeline.eval_batches(short, num_batches=5, **kw)
  assert len(ev) == 3
  every_chunk = _lm(short, global_batch_size=17, shuffle=False).batch(0)
  real = ev[2]["weights"].any(axis=1)
  np.testing.assert_array_equal(real, np.arange(8) < 1)
  _assert_batches_equal({k: np.concatenate([ev[0][k], ev[1][k], ev[2][k][real]]) for k in ev[0]},
                        every_chunk)
  np.testing.assert_array_equal(ev[2]["inputs"][~real], np.repeat(ev[0]["inputs"][:1], 7, 0))
  for p_count in (2, 4):
    parts = [pipeline.eval_batches(short, num_batches=5, process_count=p_count,
                                   process_index=p, **kw) for p in range(p_count)]
    assert [len(part) for part in parts] == [3] * p_count
    _assert_batches_equal({k: np.concatenate([part[2][k] for part in parts]) for k in ev[2]},
                          ev[2])


def test_errors(tokens):
  with pytest.raises(ValueError, match="is empty"):
    _lm(np.zeros(0, np.uint16))
  with pytest.raises(ValueError, match=r"has 100 tokens.*= 257; lower config.batch_size"):
    _lm(tokens[:100], name="Split 'x' of dataset 'y'")
  with pytest.raises(ValueError, match="config.batch_size=6 must be a positive multiple"):
    _lm(tokens, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="config.seq_len"):
    _lm(tokens, seq_len=0)
  with pytest.raises(ValueError, match="has 100 tokens"):
    pipeline.eval_batches(tokens[:100], global_batch_size=8, seq_len=32,
                          num_batches=2, examples=EXAMPLES["lm"])
