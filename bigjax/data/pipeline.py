"""Step-indexed, deterministic, per-host-sharded LM batches.

A split is tokenised once into one memory-mapped uint16 array. Training batches
are a pure function of (seed, step, process): grain's MapDataset gives random
access, so resuming needs nothing checkpointed but the step, and the global
batch is the same whatever the process count (grain iterator states restore
only onto the same process and worker counts).

Chunks: chunk i is tokens[i*seq_len : i*seq_len + seq_len + 1] (stride seq_len,
one token of overlap), so every token but the first is a target exactly once
per epoch. Documents are joined with EOS and chunks cross document boundaries.
What a chunk becomes (next-token targets, a reversed copy, masked bytes) is the
task's `ChunkExamples` (bigjax/tasks.py); this module knows tokens, not tasks.

Examples drawn at random (a masked LM's masks) take a generator that grain
seeds with (seed, index in the repeated stream), so they are step-indexed too.
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

import grain
import numpy as np

from bigjax.data import corpora, tokenizer



@dataclasses.dataclass(frozen=True)
class ChunkExamples:
  """How one chunk (int32 [seq_len + 1] token ids) becomes one example: a dict
  of numpy arrays with at least "targets" and "weights". `make(chunk, rng)`
  gets a numpy Generator when `random` (else None)."""
  make: Callable[[np.ndarray, np.random.Generator | None], dict]
  random: bool = False
_READ_BLOCK = 4096  # Examples read per __getitems__ call while tokenising.


def _as_bytes(text) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _fingerprint(source, text_key: str) -> str:
  # Keys the cache on what the tokens come from, so that a change to the data or
  # to the tokenizer (the version prefix) gets a new file, never a stale one. A
  # prepared split: its files' names, ranges, sizes and modification times, which
  # preparing the dataset again renews, read at no cost per start (hashing every
  # document would reread a large corpus at every start and resume). Mocked data
  # has no files: every document's bytes.
  # "u16": caches written before bytes 253-255 stopped wrapping around in uint8.
  h = hashlib.blake2b(f"bytes+3/eos2/u16|{len(source)}|{text_key}|".encode(), digest_size=8)
  files = source.files()
  if files is not None:
    h.update(json.dumps(files).encode())
    return h.hexdigest()
  for start in range(0, len(source), _READ_BLOCK):  # Blocks, as _write_tokens reads.
    for e in source.__getitems__(range(start, min(start + _READ_BLOCK, len(source)))):
      text = _as_bytes(e[text_key])
      # Length-prefixed: ["ab", "c"] and ["a", "bc"] tokenise differently (EOS).
      h.update(len(text).to_bytes(8, "little") + text)
  return h.hexdigest()


PARTIAL = ".partial."  # <cache>.partial.<random>.raw / .npy.tmp: a write in progress.


def _write_tokens(source, text_key: str, path: str) -> None:
  """Writes the .npy atomically: temp files in the same dir named after it (a
  killed writer's are found and removed by the next), then os.replace."""
  partial = dict(dir=os.path.dirname(path), prefix=os.path.basename(path) + PARTIAL)
  fd, raw = tempfile.mkstemp(suffix=".raw", **partial)
  fd2, tmp = tempfile.mkstemp(suffix=".npy.tmp", **partial)
  os.close(fd2)
  try:
    total = 0
    with os.fdopen(fd, "wb") as f:  # Streamed in blocks: memory stays bounded.
      for start in range(0, len(source), _READ_BLOCK):
        keys = range(start, min(start + _READ_BLOCK, len(source)))
        texts = [_as_bytes(e[text_key]) for e in source.__getitems__(keys)]
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        eos_at = np.cumsum(lens + 1) - 1  # Each document is followed by EOS.
        block = np.empty(int(eos_at[-1]) + 1, np.uint16)
        is_byte = np.ones(block.size, bool)
        is_byte[eos_at] = False
        # Widened before the offset: in uint8, bytes 253-255 would wrap to PAD/BOS/EOS.
        block[is_byte] = (np.frombuffer(b"".join(texts), np.uint8).astype(np.uint16)
                          + tokenizer.OFFSET)
        block[eos_at] = tokenizer.EOS_ID
        f.write(block.astype("<u2").tobytes())
        total += block.size
    header = {"descr": "<u2", "fortran_order": False, "shape": (total,)}
    with open(tmp, "wb") as out, open(raw, "rb") as f:
      np.lib.format.write_array_header_1_0(out, header)
      shutil.copyfileobj(f, out, 1 << 24)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache.
    os.replace(tmp, path)
  finally:
    for p in (raw, tmp):
      if os.path.exists(p):
        os.remove(p)


def token_array(dataset: str, split: str, data_dir: str | None = None,
                text_key: str = "text") -> np.ndarray:
  """All texts of a split, byte-tokenised and joined with EOS, memory-mapped.

  Cached at <data_dir>/bigjax_tokens/<dataset>-<split>-<fingerprint>.npy.
  """
  return np.load(_token_cache(dataset, split, data_dir, text_key), mmap_mode="r")


def token_stats(dataset: str, split: str, data_dir: str | None = None,
                text_key: str = "text") -> dict:
  """Statistics of a split's tokens ({"unigram_entropy_bits": ...}), computed
  once with its token cache and kept next to it (<cache>.stats.json): reading
  them back costs no pass over the corpus."""
  with open(_token_cache(dataset, split, data_dir, text_key) + ".stats.json") as f:
    return json.load(f)


def _token_cache(dataset: str, split: str, data_dir: str | None, text_key: str) -> str:
  """The path of the split's token cache (and its statistics), written if missing."""
  data_dir = corpora.default_data_dir(data_dir)
  source = corpora.prepared_source(dataset, split, data_dir)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of dataset {dataset!r} is empty; fix "
                     "config.data.train_split / config.data.eval_split.")
  if text_key not in source[0]:
    raise ValueError(f"Dataset {dataset!r} has no feature {text_key!r}; its "
                     f"features: {sorted(source[0])}. Fix config.data.text_key.")
  if not isinstance(source[0][text_key], (bytes, str)):  # bytes() would make an int zeros.
    texts = sorted(k for k, v in source[0].items() if isinstance(v, (bytes, str)))
    raise ValueError(f"Feature {text_key!r} of dataset {dataset!r} holds "
                     f"{type(source[0][text_key]).__name__}, not text; its text features: "
                     f"{texts}. Fix config.data.text_key.")
  cache_dir = os.path.join(data_dir, "bigjax_tokens")
  os.makedirs(cache_dir, exist_ok=True)
  safe = lambda s: "".join(c if c.isalnum() or c in "._" else "_" for c in s)
  path = os.path.join(cache_dir, f"{safe(dataset)}-{safe(split)}-"
                                 f"{_fingerprint(source, text_key)}.npy")
  if not os.path.exists(path):
    # One writer at a time; the next finds the file written. A writer killed
    # mid-way (SIGKILL, OOM) left its partial files, up to twice the cache's size.
    with corpora.file_lock(path + ".lock"):
      if not os.path.exists(path):
        for stale in glob.glob(glob.escape(path + PARTIAL) + "*"):
          os.remove(stale)
        _write_tokens(source, text_key, path)
  if not os.path.exists(path + ".stats.json"):  # Also for caches older than the file.
    _write_atomically(path + ".stats.json", json.dumps(
        {"unigram_entropy_bits": unigram_entropy_bits(np.load(path, mmap_mode="r"))}))
  return path


def _write_atomically(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def unigram_entropy_bits(tokens) -> float:
  """Entropy (bits per token) of the token histogram: the loss of the best
  model that ignores context, which a trained LM must beat (nats: × ln 2)."""
  tokens = np.asarray(tokens).ravel()
  counts = np.zeros(0, np.int64)
  for i in range(0, tokens.size, 1 << 24):  # Blocks: bincount copies to int64.
    c = np.bincount(tokens[i:i + (1 << 24)])
    counts = np.pad(counts, (0, max(c.size - counts.size, 0)))
    counts[:c.size] += c
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-(p * np.log2(p)).sum())


def check_batch_split(global_batch_size: int, process_index: int, process_count: int):
  """Every process must get an equal, non-empty share of each global batch."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"config.batch_size={global_batch_size} must be a positive multiple of "
        f"the process count {process_count}: set batch_size to a multiple of it.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")


def _num_chunks(tokens, global_batch_size, seq_len, process_index,
                process_count, name) -> int:
  """Validates the arguments; returns how many chunks the tokens hold."""
  if seq_len <= 0:
    raise ValueError(f"config.seq_len must be positive, got {seq_len}.")
  check_batch_split(global_batch_size, process_index, process_count)
  n = len(tokens)
  if n == 0:
    raise ValueError(f"{name} is empty: it holds no tokens.")
  need = global_batch_size * seq_len + 1
  if n < need:
    raise ValueError(
        f"{name} has {n} tokens, fewer than one batch of batch_size × seq_len "
        f"+ 1 = {global_batch_size} × {seq_len} + 1 = {need}; lower "
        "config.batch_size or config.seq_len.")
  return (n - 1) // seq_len


def _examples(ds, tokens, seq_len: int, examples: ChunkExamples, seed: int):
  """Maps a dataset of chunk indices to examples."""
  read = lambda i: np.asarray(tokens[i * seq_len:(i + 1) * seq_len + 1], np.int32)
  if not examples.random:
    return ds.map(lambda i: examples.make(read(i), None))
  # grain seeds the generator from (seed, index in `ds`), not the chunk id: a
  # resumed run redraws the same examples, and a chunk's next epoch (a later
  # index) gets fresh ones.
  return ds.random_map(lambda i, rng: examples.make(read(i), rng), seed=seed % 2**32)


def shuffle_seed(seed: int) -> int:
  """The grain shuffle seed of run seed `seed`. grain shuffles epoch e with seed
  + e, so runs with seeds s and s + 1 would see the same orders one epoch
  apart. Multiplying by 2**32/φ (Fibonacci hashing) puts seeds that differ by
  d < 1,000 at least ~1.9M apart mod 2**32 (|d·φ - n| > 1/(√5·d), Hurwitz), so
  no two such runs share an epoch's order in their first million epochs; seed 0
  keeps its order."""
  return (seed * 0x9E3779B9) % 2**32


def per_process(ds, global_batch_size, process_index, process_count):
  """This process's batches of `ds`."""
  # Local batches k*P + p, p = 0..P-1, tile global batch k in process order,
  # so the union of the processes' batches does not depend on P.
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  return ds[process_index::process_count]


class LMBatches:
  """Training batches of one process, indexed by global step.

  `batch(step)` is a dict of numpy arrays, [batch_size // P, ...] each: the
  rows `examples` makes of the step's chunks. Each epoch is reshuffled (grain
  mixes the epoch into the seed) and random examples are redrawn; batches run
  across epoch boundaries. `name` describes the tokens in error messages.
  """

  def __init__(self, tokens, *, global_batch_size: int, seq_len: int, seed: int,
               examples: ChunkExamples, process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, name: str = "The token array"):
    self.num_chunks = _num_chunks(tokens, global_batch_size, seq_len,
                                  process_index, process_count, name)
    ds = grain.MapDataset.range(self.num_chunks)
    if shuffle:
      ds = ds.shuffle(seed=shuffle_seed(seed))
    ds = _examples(ds.repeat(None), tokens, seq_len, examples, seed)
    self._ds = per_process(ds, global_batch_size, process_index, process_count)
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch = self.num_chunks / global_batch_size

  def batch(self, step: int) -> dict:
    return self._ds[step]

  def iterate(self, start_step: int = 0):
    """Yields batch(start_step), batch(start_step + 1), ... forever."""
    # In-process reads: REFERENCE measured grain threads and workers as slower.
    return iter(self._ds[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=0)))


def eval_batches(tokens, *, global_batch_size: int, seq_len: int, num_batches: int,
                 examples: ChunkExamples, process_index: int = 0, process_count: int = 1,
                 name: str = "The token array") -> list[dict]:
  """The first `num_batches` global batches of the unshuffled chunks (this
  process's part of each), the same every call (random examples draw with a
  fixed seed, so eval losses stay comparable). A split shorter than that is
  evaluated whole: its last batch is filled up with copies of chunk 0 at weight
  0, as examples.eval_batches does, so that every process gets as many batches
  (or their eval loops would disagree and hang in a collective) and no chunk is
  left out. A split that holds no whole batch raises."""
  n = _num_chunks(tokens, global_batch_size, seq_len, process_index, process_count, name)
  real = _examples(grain.MapDataset.range(n), tokens, seq_len, examples, seed=0)
  total = min(num_batches, -(-n // global_batch_size)) * global_batch_size
  unweighted = lambda e: {**e, "weights": np.zeros_like(e["weights"])}
  ds = grain.MapDataset.range(total).map(lambda i: real[i] if i < n else unweighted(real[0]))
  ds = per_process(ds, global_batch_size, process_index, process_count)
  return [ds[i] for i in range(total // global_batch_size)]
