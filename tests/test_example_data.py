"""Tests of the example (features, label) data: the sklearn_toy tfds builder
and bigjax.data.examples' loading, standardising and batching."""
import sys

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from bigjax import config as config_lib, tasks
from bigjax.data import corpora, examples
from configs import linear_regression, mlp


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _sklearn_reference(config):
  """The expected (x, y) per split, straight from sklearn and the i % 5 rule."""
  data = getattr(sklearn.datasets, f"load_{config}")()
  x = data.data
  if config == "digits":
    x = x.reshape(-1, 8, 8, 1) / 16.0
  test = np.arange(len(x)) % 5 == 0
  y = data.target.astype(np.float32 if config == "diabetes" else np.int32)
  return {"train": (x[~test].astype(np.float32), y[~test]),
          "test": (x[test].astype(np.float32), y[test])}


# (config, features shape, train size, test size).
_CONFIGS = [("digits", (8, 8, 1), 1437, 360), ("breast_cancer", (30,), 455, 114),
            ("diabetes", (10,), 353, 89)]


@pytest.mark.parametrize("config,shape,n_train,n_test", _CONFIGS)
def test_sklearn_toy_matches_sklearn(data_dir, config, shape, n_train, n_test):
  ref = _sklearn_reference(config)
  for split, n in (("train", n_train), ("test", n_test)):
    x, y = examples.load_split(f"sklearn_toy/{config}", split, data_dir)
    assert x.shape == (n, *shape) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == ref[split][1].dtype
    np.testing.assert_array_equal(x, ref[split][0])
    np.testing.assert_array_equal(y, ref[split][1])
  assert n_train + n_test == len(getattr(sklearn.datasets, f"load_{config}")().data)
  builder = tfds.builder(f"sklearn_toy/{config}", data_dir=data_dir)
  assert builder.info.features["features"].shape == shape


def test_sklearn_toy_splits_disjoint_and_cover(data_dir):
  x = {s: examples.load_split("sklearn_toy/diabetes", s, data_dir)[0]
       for s in ("train", "test")}
  rows = lambda a: {r.tobytes() for r in a}
  assert not rows(x["train"]) & rows(x["test"])
  full = sklearn.datasets.load_diabetes().data.astype(np.float32)
  assert rows(x["train"]) | rows(x["test"]) == rows(full)
  assert len(rows(full)) == len(full)  # No duplicate rows hide an overlap.


def test_sklearn_toy_default_config_and_errors(data_dir):
  assert len(corpora.prepared_source("sklearn_toy", "test", data_dir)) == 360
  with pytest.raises(ValueError, match=r"no config 'iris'.*config.data.dataset"):
    corpora.prepared_source("sklearn_toy/iris", "train", data_dir)
  with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
    corpora.prepared_source("sklearn_toy/digits", "validation", data_dir)


def test_missing_key_error_names_field(data_dir):
  with pytest.raises(ValueError, match=r"no feature 'image'.*\['features', "
                     r"'label'\]. Fix config.data.feature_key"):
    examples.load_split("sklearn_toy/digits", "test", data_dir, feature_key="image")
  with pytest.raises(ValueError, match="no feature 'y'.*Fix config.data.label_key"):
    examples.load_split("sklearn_toy/digits", "test", data_dir, label_key="y")


def test_sklearn_toy_without_sklearn_says_how_to_install(tmp_path, monkeypatch):
  # None in sys.modules: `import sklearn.datasets` fails, as on a plain install.
  monkeypatch.setitem(sys.modules, "sklearn", None)
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  with pytest.raises(ImportError, match=r"sklearn_toy/digits.*scikit-learn.*"
                     r"pip install scikit-learn") as e:
    corpora.prepared_source("sklearn_toy/digits", "train", str(tmp_path))
  assert isinstance(e.value, ValueError)  # A run reports it as a data problem.
  assert not tfds.builder("sklearn_toy/digits", data_dir=str(tmp_path)).is_prepared()


# Labels the task's loss can take (tasks.ExampleTask.check_labels): anything else
# trains to a NaN or meaningless loss without an error.

def _load(config, data_dir):
  config.data.data_dir = data_dir
  return tasks.get(config.task).load_data(config, 0, 1)


def test_class_ids_must_fit_num_outputs(data_dir):
  config = mlp.get_config("variant=deep,runlocal")  # Digits: sklearn's ids 0..9.
  assert sklearn.datasets.load_digits().target.max() == 9
  config.model.num_outputs = 10
  _load(config, data_dir)  # Fits exactly.
  config.model.num_outputs = 9
  with pytest.raises(config_lib.ConfigError, match=r"Split 'train' of dataset "
                     r"'sklearn_toy/digits': label 'label' \(config.data.label_key\) holds "
                     r"class ids up to 9, but config.model.num_outputs=9 .* Set "
                     r"--config.model.num_outputs=10"):
    _load(config, data_dir)
  config.data.update(dataset="sklearn_toy/diabetes", feature_columns=())  # Real-valued.
  with pytest.raises(config_lib.ConfigError, match="float32, not integer class ids.*"
                     "task='regress'"):
    _load(config, data_dir)


def test_binary_labels_must_be_0_or_1(data_dir):
  config = mlp.get_config("variant=binary,runlocal")
  _load(config, data_dir)  # Breast cancer: 0 = malignant, 1 = benign.
  config.data.dataset = "sklearn_toy/digits"
  with pytest.raises(config_lib.ConfigError, match=r"label 'label' .* holds 2 \(of 10 "
                     r"distinct values\); task='binary' takes labels 0 and 1 only"):
    _load(config, data_dir)


def test_regression_targets_must_be_finite(data_dir, monkeypatch):
  config = linear_regression.get_config("runlocal")
  _load(config, data_dir)
  x = np.zeros((64, 1), np.float32)
  y = np.arange(64, dtype=np.float32)
  y[[3, 9]] = [np.nan, np.inf]
  monkeypatch.setattr(examples, "load_train_eval", lambda *a, **k: (x, y, x, y))
  with pytest.raises(config_lib.ConfigError, match="holds 2 NaN or infinite labels"):
    _load(config, data_dir)


def test_features_must_be_finite(data_dir, monkeypatch):
  config = mlp.get_config("variant=binary,runlocal")  # Standardised: one NaN spreads.
  x, y = examples.load_split("sklearn_toy/breast_cancer", "train", data_dir)
  x[5, 2] = np.nan
  real = examples.load_split
  monkeypatch.setattr(examples, "load_split", lambda name, split, *a, **k: (
      (x, y) if split == "train" else real(name, split, *a, **k)))
  # A ValueError: train.run reports it as `Invalid config: config.data: ...`.
  with pytest.raises(ValueError, match=r"Split 'train' .* feature 'features' "
                     r"\(config.data.feature_key\) holds 1 NaN or infinite values \(the first "
                     r"in row 5\)"):
    _load(config, data_dir)


def test_mock_mnist(tmp_path):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    x, y = examples.load_split("mnist", "train", str(tmp_path), feature_key="image")
  assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32
  assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5  # Scaled from uint8.
  assert y.shape == (6,) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10


def test_empty_split(tmp_path):
  with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="Split 'train' of dataset 'mnist' is empty"):
      examples.load_split("mnist", "train", str(tmp_path), feature_key="image")


def test_standardize_uses_train_statistics():
  rng = np.random.default_rng(0)
  train = rng.normal(3.0, 2.0, (100, 4))
  train[:, 3] = 7.0  # Constant in training.
  test = rng.normal(-5.0, 9.0, (20, 4))
  tr, te = examples.standardize(train, test)
  assert tr.dtype == te.dtype == np.float32
  np.testing.assert_allclose(tr[:, :3].mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(tr[:, :3].std(0), 1, atol=1e-5)
  mean, std = train.mean(0), train.std(0)
  np.testing.assert_allclose(te[:, :3], (test[:, :3] - mean[:3]) / std[:3], rtol=1e-5)
  np.testing.assert_array_equal(tr[:, 3], 0)
  np.testing.assert_allclose(te[:, 3], test[:, 3] - 7.0, rtol=1e-6)  # Shifted only.
  (alone,) = examples.standardize(train)
  np.testing.assert_array_equal(alone, tr)


# Batches, on synthetic data: row i of x holds i, so rows name their examples.

def _xy(n):
  x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
  return x, np.arange(n) % 7


def _batches(n=40, **kw):
  x, y = _xy(n)
  return examples.ExampleBatches(x, y, **{"global_batch_size": 8, "seed": 0, **kw})


def test_batches_deterministic():
  b = _batches()
  x = b.batch(3)
  assert x["inputs"].shape == (8, 3) and x["inputs"].dtype == np.float32
  assert x["weights"].dtype == np.float32 and (x["weights"] == 1).all()
  np.testing.assert_array_equal(x["targets"], x["inputs"][:, 0].astype(int) % 7)
  for k in x:
    np.testing.assert_array_equal(x[k], _batches().batch(3)[k])
  assert not np.array_equal(x["inputs"], b.batch(4)["inputs"])
  assert not np.array_equal(x["inputs"], _batches(seed=1).batch(3)["inputs"])
  np.testing.assert_array_equal(_batches(shuffle=False).batch(1)["inputs"][:, 0],
                                np.arange(8, 16))
  it = b.iterate(2)
  for step in (2, 3):
    np.testing.assert_array_equal(next(it)["inputs"], b.batch(step)["inputs"])


def test_epochs_cover_every_example_once_and_reshuffle():
  b = _batches(n=40)  # 5 batches per epoch.
  assert b.steps_per_epoch == 5 and b.num_examples == 40
  ids = lambda steps: np.concatenate([b.batch(s)["inputs"][:, 0] for s in steps])
  epoch0, epoch1 = ids(range(5)), ids(range(5, 10))
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(40))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(40))
  assert not np.array_equal(epoch0, epoch1)


def test_process_shards_tile_global_batch():
  for step in (0, 6):
    ref = _batches().batch(step)
    parts = [_batches(process_index=p, process_count=2).batch(step) for p in range(2)]
    assert parts[0]["inputs"].shape == (4, 3)
    for k in ref:
      np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), ref[k])


def test_batch_errors():
  with pytest.raises(ValueError, match="config.batch_size=6 must be a positive multiple"):
    _batches(global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="has 5 examples, fewer than one batch of 8; "
                     "lower config.batch_size"):
    _batches(n=5)
  with pytest.raises(ValueError, match="is empty"):
    _batches(n=0)
  with pytest.raises(ValueError, match="4 feature rows but 3 labels"):
    examples.ExampleBatches(np.zeros((4, 2)), np.zeros(3), global_batch_size=2, seed=0)


@pytest.mark.parametrize("n", [5, 16, 21])
def test_eval_batches_weighted_mean_is_split_mean(n):
  x, y = _xy(n)
  y = y.astype(np.float32) ** 2
  for p_count in (1, 2):
    parts = [examples.eval_batches(x, y, global_batch_size=8, process_index=p,
                                   process_count=p_count) for p in range(p_count)]
    assert {len(part) for part in parts} == {-(-n // 8)}
    assert all(b["inputs"].shape == (8 // p_count, 3) for part in parts for b in part)
    batches = [b for part in parts for b in part]
    total = sum((b["weights"] * b["targets"]).sum() for b in batches)
    assert sum(b["weights"].sum() for b in batches) == n
    assert total / n == pytest.approx(y.mean(), rel=1e-6)
    # The real rows are the split, each once; in order with one process.
    real = np.concatenate([b["inputs"][b["weights"] > 0, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    if p_count == 1:
      np.testing.assert_array_equal(real, np.arange(n))
