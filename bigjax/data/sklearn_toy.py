"""scikit-learn's bundled toy datasets as a tfds dataset, so the model zoo
(MLP, CNN, linear regression) trains on real data with no download.

The data files ship inside scikit-learn (not a core dependency: `pip install
scikit-learn`, or the `zoo` extra), so `corpora.prepared_source` builds this on
first use, like `stdlib_py`. Configs: "sklearn_toy/digits" (8×8 images,
10 classes), "sklearn_toy/breast_cancer" (30 features, 2 classes) and
"sklearn_toy/diabetes" (10 features, a real-valued target).
"""
import numpy as np
import tensorflow_datasets as tfds

# Example i is in "test" iff i % _TEST_EVERY == 0: a fixed rule on sklearn's own
# order, so the split is the same on every machine and run. None of the three is
# sorted by label, so every fifth row gives each split every class.
_TEST_EVERY = 5


def _digits(x):
  # Pixel counts 0..16 (8×8 downsampled 32×32 bitmaps), scaled to [0, 1] and
  # given a channel axis so the CNN sees NHWC images.
  return (x / 16.0).reshape(-1, 8, 8, 1)


# config name -> (sklearn loader, features shape, label feature, feature prep,
#                 description).
_SPECS = {
    "digits": ("load_digits", (8, 8, 1), lambda: tfds.features.ClassLabel(num_classes=10),
               _digits, "1,797 8×8 handwritten digits (UCI), pixels / 16, 10 classes."),
    "breast_cancer": (
        "load_breast_cancer", (30,), lambda: tfds.features.ClassLabel(num_classes=2),
        lambda x: x, "569 Wisconsin breast-cancer cases, 30 raw (unscaled) "
        "features; label 0 = malignant, 1 = benign."),
    "diabetes": (
        "load_diabetes", (10,), lambda: tfds.features.Tensor(shape=(), dtype=np.float32),
        lambda x: x, "442 diabetes patients, 10 features as sklearn scales them "
        "(mean-centred, unit L2 norm per column); label = disease progression "
        "one year later (25..346)."),
}


class MissingPackageError(ImportError, ValueError):
  """A package needed to build a dataset is not installed. Also a ValueError, so
  a run reports it in one line as a data problem (train.run's DataError)."""


class SklearnToy(tfds.core.GeneratorBasedBuilder):
  """Toy datasets bundled with scikit-learn, split 80/20 into train/test."""

  name = "sklearn_toy"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = None  # See corpora.StdlibPy.
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=s[4])
                     for n, s in _SPECS.items()]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")  # See corpora.StdlibPy.
    super().__init__(**kwargs)

  def _info(self):
    _, shape, label, _, description = _SPECS[self.builder_config.name]
    # Built directly, as corpora.StdlibPy explains.
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=shape, dtype=np.float32),
            "label": label(),
        }),
        supervised_keys=("features", "label"),
        # Keep sklearn's row order in the files (tfds otherwise orders them by
        # a hash of the key): test example j is then sklearn row 5j, easy to
        # check by hand. Training shuffles anyway (examples.ExampleBatches).
        disable_shuffling=True,
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files ship inside sklearn.
    loader, _, _, prep, _ = _SPECS[self.builder_config.name]
    try:  # Here, not at the top: only preparing needs it.
      import sklearn.datasets
    except ImportError as e:
      raise MissingPackageError(
          f"Dataset 'sklearn_toy/{self.builder_config.name}' is built from data that "
          f"ships inside scikit-learn, which cannot be imported here ({e}). Install it: "
          "pip install scikit-learn (or, in a checkout, pip install -e '.[zoo]').") from e
    data = getattr(sklearn.datasets, loader)()
    x = prep(data.data).astype(np.float32)
    y = data.target  # int64 class ids, or float64 (diabetes): stored as float32.
    y = y.astype(np.float32) if y.dtype.kind == "f" else y
    test = np.arange(len(x)) % _TEST_EVERY == 0
    return {"train": self._generate_examples(x, y, np.flatnonzero(~test)),
            "test": self._generate_examples(x, y, np.flatnonzero(test))}

  def _generate_examples(self, x, y, indices):
    for i in indices:
      # The key is sklearn's row index, unique across both splits.
      yield int(i), {"features": x[i], "label": y[i]}
