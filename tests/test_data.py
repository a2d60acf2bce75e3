"""Tests of bigjax.data: tokenizer, corpora, token cache and batch pipeline."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest
import grain
import tensorflow_datasets as tfds

from bigjax import tasks
from bigjax.data import corpora, pipeline, tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data dir with stdlib_py prepared once for the whole module."""
  d = str(tmp_path_factory.mktemp("tfds"))
  corpora.prepared_source("stdlib_py", "train", d)
  return d


@pytest.fixture(scope="module")
def tokens(data_dir):
  return pipeline.token_array("stdlib_py", "validation", data_dir)


# What each token task makes of a chunk (bigjax/tasks.py).
EXAMPLES = {"lm": tasks.next_token_examples(), "reverse": tasks.reversed_examples(),
            "mlm": tasks.masked_examples(0.15)}


def _lm(tokens, task="lm", **kw):
  args = dict(global_batch_size=8, seq_len=32, seed=0, examples=EXAMPLES[task])
  return pipeline.LMBatches(tokens, **{**args, **kw})


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# Tokenizer.

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


# Masked LM.

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
