"""Step-indexed, per-host-sharded batches of (features, label) examples: the
counterpart of pipeline.LMBatches for the classification and regression models.

A split of such data (sklearn_toy, mnist, ...) fits in memory, so it is read
once into numpy arrays. As in pipeline.py, training batches are a pure function
of (seed, step, process): grain's MapDataset shuffles and batches example
*indices*, and rows are gathered from the arrays by fancy-indexing, so resuming
needs nothing checkpointed but the step, and the global batch is the same
whatever the process count.
"""
import grain
import numpy as np

from bigjax.data import corpora, pipeline

_READ_BLOCK = 4096  # Examples read per __getitems__ call.


def load_split(dataset: str, split: str, data_dir: str | None = None,
               feature_key: str = "features", label_key: str = "label"):
  """(x, y) of a whole split: x float32 [N, ...] (uint8 data such as images is
  divided by 255, into [0, 1]); y int32 for integer labels, else float32."""
  source = corpora.prepared_source(dataset, split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"Split {split!r} of dataset {dataset!r} is empty; fix "
                     "config.data.train_split / config.data.eval_split.")
  for key, field in ((feature_key, "feature_key"), (label_key, "label_key")):
    if key not in source[0]:
      raise ValueError(f"Dataset {dataset!r} has no feature {key!r}; its "
                       f"features: {sorted(source[0])}. Fix config.data.{field}.")
  xs, ys = [], []
  for start in range(0, n, _READ_BLOCK):  # Blocks: one read call per block.
    for e in source.__getitems__(range(start, min(start + _READ_BLOCK, n))):
      xs.append(e[feature_key])
      ys.append(e[label_key])
  x, y = np.stack(xs), np.asarray(ys)
  for a, key, field in ((x, feature_key, "feature_key"), (y, label_key, "label_key")):
    if a.dtype.kind not in "biuf":  # Text, say: no model here can take it.
      raise ValueError(f"Feature {key!r} of dataset {dataset!r} is {a.dtype}, "
                       f"not numeric. Fix config.data.{field}.")
  x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)
  return x, y.astype(np.float32 if y.dtype.kind == "f" else np.int32)


def load_train_eval(dataset: str, train_split: str, eval_split: str, *,
                    data_dir: str | None = None, feature_key: str = "features",
                    label_key: str = "label", feature_columns=(), standardize_features=False):
  """(x_train, y_train, x_eval, y_eval) as config.data describes them: optionally
  only some columns of flat (tabular) features, optionally standardised with the
  training split's statistics."""
  keys = dict(data_dir=data_dir, feature_key=feature_key, label_key=label_key)
  x_train, y_train = load_split(dataset, train_split, **keys)
  x_eval, y_eval = load_split(dataset, eval_split, **keys)
  if feature_columns:
    columns = list(feature_columns)
    if x_train.ndim != 2 or max(columns) >= x_train.shape[1] or min(columns) < 0:
      raise ValueError(f"feature_columns={columns} do not index the features of shape "
                       f"{x_train.shape[1:]}; use column numbers of flat features.")
    x_train, x_eval = x_train[:, columns], x_eval[:, columns]
  for split, x in ((train_split, x_train), (eval_split, x_eval)):
    # One NaN cell would make its column NaN everywhere once standardised, and
    # every update skipped; unstandardised, every batch holding its row.
    bad = ~np.isfinite(x) if x.dtype.kind == "f" else np.zeros((0,), bool)
    if bad.any():
      raise ValueError(f"Split {split!r} of dataset {dataset!r}: feature {feature_key!r} "
                       f"(config.data.feature_key) holds {bad.sum()} NaN or infinite values "
                       f"(the first in row {np.argwhere(bad)[0][0]}); drop or impute them.")
  if standardize_features:
    x_train, x_eval = standardize(x_train, x_eval)
  return x_train, y_train, x_eval, y_eval


def standardize(x_train, *others):
  """(x_train, *others), each shifted and scaled per feature by x_train's mean
  and std only (the held-out data must not leak into the statistics); float32.
  Features constant in training are only shifted: dividing by a floored std
  would blow a held-out value there up by ~1e6."""
  x_train = np.asarray(x_train, np.float64)
  mean, std = x_train.mean(0), x_train.std(0)
  std = np.where(std < 1e-6, 1.0, std)
  return tuple(((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
               for x in (x_train, *others))


def _num_examples(x, y, global_batch_size, process_index, process_count, name):
  """Validates the arguments; returns how many examples there are."""
  pipeline.check_batch_split(global_batch_size, process_index, process_count)
  if len(x) != len(y):
    raise ValueError(f"{name}: {len(x)} feature rows but {len(y)} labels.")
  if len(x) == 0:
    raise ValueError(f"{name} is empty: it holds no examples.")
  return len(x)


def _gather(x, y):
  return lambda idx: {"inputs": x[idx], "targets": y[idx],
                      "weights": np.ones(len(idx), np.float32)}


class ExampleBatches:
  """Training batches of one process, indexed by global step.

  `batch(step)` is {"inputs": float32 [batch_size // P, ...], "targets": the
  rows of y, "weights": float32 ones [batch_size // P]}. Each epoch is
  reshuffled (grain mixes the epoch into the seed); batches run across epoch
  boundaries. `name` describes the data in error messages.
  """

  def __init__(self, x, y, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, name: str = "The training split"):
    x, y = np.asarray(x, np.float32), np.asarray(y)
    n = _num_examples(x, y, global_batch_size, process_index, process_count, name)
    if n < global_batch_size:
      raise ValueError(f"{name} has {n} examples, fewer than one batch of "
                       f"{global_batch_size}; lower config.batch_size.")
    ds = grain.MapDataset.range(n)
    if shuffle:
      ds = ds.shuffle(seed=pipeline.shuffle_seed(seed))
    ds = pipeline.per_process(ds.repeat(None), global_batch_size,
                               process_index, process_count)
    self._ds = ds.map(_gather(x, y))
    self.num_examples = n
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch = n / global_batch_size

  def batch(self, step: int) -> dict:
    return self._ds[step]

  def iterate(self, start_step: int = 0):
    """Yields batch(start_step), batch(start_step + 1), ... forever."""
    return iter(self._ds[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=0)))  # As pipeline.LMBatches.iterate.


def eval_batches(x, y, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, name: str = "The eval split") -> list[dict]:
  """The whole split in order, in global batches (this process's part of each,
  rows as in training). The last is padded with copies of row 0 at weight 0,
  so the weighted mean of a per-row metric over all batches and processes is
  exactly its mean over the split, and every process gets as many batches (or
  the processes' eval loops would disagree and hang in a collective)."""
  x, y = np.asarray(x, np.float32), np.asarray(y)
  n = _num_examples(x, y, global_batch_size, process_index, process_count, name)
  num_batches = -(-n // global_batch_size)
  idx = np.arange(num_batches * global_batch_size)
  weights = (idx < n).astype(np.float32)
  # Global batch b's rows [p*L, (p+1)*L) go to process p, as pipeline.per_process.
  local = lambda a: a.reshape(num_batches, process_count, -1)[:, process_index]
  idx, weights = local(np.where(idx < n, idx, 0)), local(weights)
  return [{**_gather(x, y)(i), "weights": w} for i, w in zip(idx, weights)]
