"""tfds corpora, read with random access and without TensorFlow.

`stdlib_py` is built here from the running interpreter's standard library, and
`sklearn_toy` (sklearn_toy.py) from the toy datasets shipped in scikit-learn, so
a run on either needs no download. Any other tfds dataset works once it is
prepared in array_record format in the data dir; we never download (see
`prepared_source`).
"""
import contextlib
import fcntl  # POSIX file locks: a data dir is a local (or NFS) path.
import os
import sys
import zlib

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

from bigjax.data import sklearn_toy

# Directory names pruned anywhere under the stdlib root: installed packages are
# not the stdlib, and test suites are huge, repetitive and full of odd encodings.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_VALIDATION_PERCENT = 5


def stdlib_root() -> str:
  return os.path.dirname(os.__file__)


def _is_validation(rel_path: str) -> bool:
  # A stable hash of the path (not Python's salted hash()) gives the same
  # file-level split on every machine and run, so no file is in both splits.
  return zlib.crc32(rel_path.encode("utf-8")) % 100 < _VALIDATION_PERCENT


def stdlib_files() -> list[str]:
  """Sorted relative paths of the stdlib's own .py files."""
  root, out = stdlib_root(), []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    out += [os.path.relpath(os.path.join(dirpath, f), root)
            for f in filenames if f.endswith(".py")]
  return sorted(out)


class StdlibPy(tfds.core.GeneratorBasedBuilder):
  """The CPython standard library's .py files, split by file into train and
  validation (~8% of the files: the CRC32 of similar paths is not uniform mod 100).
  One config per Python minor version, since the files differ
  between versions and a data dir may be shared by several interpreters."""

  name = "stdlib_py"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No checksums file sits beside this module. And tfds 4.9.10 computing the
  # path for a builder inside a package imports `importlib_resources`, which
  # it only requires on Python < 3.9: without this, preparing fails there.
  code_path = None
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}{sys.version_info.minor}",
      description=f"Python {sys.version_info.major}.{sys.version_info.minor}")]

  def __init__(self, **kwargs):
    # array_record is the format with random access and no TensorFlow needed.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self):
    # Built directly: `dataset_info_from_configs` looks for metadata files next
    # to the builder's module, which only works for builders in a tfds package.
    return tfds.core.DatasetInfo(
        builder=self,
        description="The running CPython's standard library source (.py).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),  # Relative to the stdlib root.
        }),
        homepage="https://github.com/python/cpython",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    files = stdlib_files()
    return {
        "train": self._generate_examples([f for f in files if not _is_validation(f)]),
        "validation": self._generate_examples([f for f in files if _is_validation(f)]),
    }

  def _generate_examples(self, paths):
    root = stdlib_root()
    for rel in paths:
      with open(os.path.join(root, rel), "rb") as f:
        # A few stdlib files are not utf-8 (e.g. declared latin-1); replacing
        # the odd byte keeps them rather than failing the whole build.
        text = f.read().decode("utf-8", errors="replace")
      yield rel, {"text": text, "path": rel}


def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def is_mocked() -> bool:
  """True inside `tfds.testing.mock_data`, which swaps DatasetBuilder methods
  for closures defined in `mock_data`: builders then know no splits and have
  nothing on disk, so our own checks must step aside."""
  fn = tfds.core.DatasetBuilder.download_and_prepare
  return "mock_data" in getattr(fn, "__qualname__", "")


@contextlib.contextmanager
def file_lock(path: str):
  """Holds an exclusive OS lock on `path` (created if missing): one writer at a time."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# Builders whose sources ship on this machine: `prepared_source` prepares them
# on first use instead of asking for a `tfds build`.
_LOCAL_BUILDERS = {b.name: b for b in (StdlibPy, sklearn_toy.SklearnToy)}


def _prepare_local(name: str, data_dir: str):
  """Prepares (once) and returns a `_LOCAL_BUILDERS` dataset; `name` in tfds
  syntax, "name[/config][:version]" (no config: the first one)."""
  ds_name, kwargs = naming.parse_builder_name_kwargs(name)
  cls = _LOCAL_BUILDERS[ds_name.name]
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if kwargs.get("config", configs[0]) not in configs:
    raise ValueError(
        f"Dataset {ds_name.name!r} has no config {kwargs['config']!r}; its "
        f"configs: {configs}. Fix config.data.dataset, e.g. "
        f"'{ds_name.name}/{configs[0]}'.")
  make = lambda: _named_version(name, lambda: cls(data_dir=data_dir, **kwargs))
  builder = make()
  if is_mocked() or builder.is_prepared():
    return builder
  # tfds writes into an `incomplete.*` dir and renames it when done, so a crash
  # never leaves a prepared-looking dataset; the lock makes a second process
  # wait instead of failing on that rename, then reuse the first one's result.
  os.makedirs(data_dir, exist_ok=True)
  with file_lock(os.path.join(data_dir, f".{cls.name}.lock")):
    builder = make()  # Re-read: it may be ready now.
    if not builder.is_prepared():
      builder.download_and_prepare()
  return builder


def _named_version(name: str, make):
  """make(), with tfds's AssertionError for a version it has not ("cannot be
  loaded at version X, only: ...") as a ValueError naming the field."""
  try:
    return make()
  except AssertionError as e:
    if "cannot be loaded at version" not in str(e):
      raise
    raise ValueError(f"{e} Fix config.data.dataset: drop ':version' from {name!r}, or "
                     "name one listed.") from None


def _unprepared_error(name: str, data_dir: str, where: str) -> ValueError:
  return ValueError(
      f"Dataset {name!r} is not prepared in {where} (data dir {data_dir!r}, from "
      "config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets). "
      "bigjax never downloads: prepare it once in array_record format where "
      "there is internet and TensorFlow is installed (`tfds build` imports it: "
      "`pip install tensorflow` there), e.g. `tfds build "
      f"{name} --data_dir={data_dir} --file_format=array_record`, and point "
      "config.data.data_dir at that dir (copied here if built elsewhere); reading a "
      "prepared dataset needs no TensorFlow. Or set config.data.dataset='stdlib_py' "
      "(text), or 'sklearn_toy/digits', 'sklearn_toy/breast_cancer' or "
      "'sklearn_toy/diabetes' (examples), which are built locally.")


def _prepared_builder(name: str, data_dir: str):
  # Checked by hand: tfds.data_source would start a download here, or with
  # download=False fail with a misleading "TFRECORD format is not supported".
  try:
    builder = _named_version(name, lambda: tfds.builder(name, data_dir=data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    # Not a registered name and no prepared files for it in data_dir.
    raise _unprepared_error(name, data_dir, os.path.join(data_dir, name)) from None
  if not is_mocked() and not builder.is_prepared():
    raise _unprepared_error(name, data_dir, os.fspath(builder.data_dir))
  return builder


class _BytesText:
  """Random-access source whose str fields come back as utf-8 bytes, as real
  tfds Text features do (mocked data gives str)."""

  def __init__(self, source):
    self._source = source
    # tfds's mocked source has a broken __getitems__ (a partial missing self).
    self._batched = not is_mocked()

  def __len__(self):
    return len(self._source)

  @staticmethod
  def _fix(example):
    return {k: v.encode("utf-8") if isinstance(v, str) else v
            for k, v in example.items()}

  def __getitem__(self, i):
    return self._fix(self._source[i])

  def __getitems__(self, keys):
    if not self._batched:
      return [self[i] for i in keys]
    return [self._fix(e) for e in self._source.__getitems__(list(keys))]

  def files(self) -> list[tuple] | None:
    """(path, skip, take, size, mtime) of each prepared file range the split
    reads, or None for mocked data, which has nothing on disk. Preparing a
    dataset again writes its files anew, so these change whenever its data can."""
    if is_mocked():
      return None
    split = self._source.dataset_info.splits[self._source.split]
    return [(f.filename, f.skip, f.take, stat.length, stat.mtime)
            for f in split.file_instructions
            for stat in [epath.Path(f.filename).stat()]]


def prepared_source(name: str, split: str, data_dir: str | None = None):
  """Random-access source (len, [i], __getitems__) of dicts for one split.

  `name` takes tfds syntax ("sklearn_toy/digits"). "stdlib_py" and
  "sklearn_toy/<config>" are prepared on first use; any other dataset must
  already be prepared in `data_dir` (see `default_data_dir`), else a ValueError
  says how. Text fields are bytes. `split` takes tfds syntax ("train[:10%]").
  """
  data_dir = default_data_dir(data_dir)
  # A plain split, not tfds's parser, which raises on a malformed name: other
  # datasets' names then reach tfds.builder unparsed, as they always did.
  if name.split("/")[0].split(":")[0] in _LOCAL_BUILDERS:
    builder = _prepare_local(name, data_dir)
  else:
    builder = _prepared_builder(name, data_dir)
  if not is_mocked():  # Mocked builders know no splits; any split works there.
    known = sorted(builder.info.splits.keys())
    for part in split.split("+"):
      if part.split("[")[0].strip() not in known + ["all"]:  # "all": tfds.Split.ALL
        raise ValueError(
            f"Unknown split {split!r} of dataset {name!r}; available splits: "
            f"{known}. Fix config.data.train_split / config.data.eval_split.")
    try:  # Bad slice syntax and empty slices, told before array_record's own words.
      examples = builder.info.splits[split].num_examples
    except ValueError as e:
      raise ValueError(f"Split {split!r} of dataset {name!r}: {e} Fix config.data.train_split "
                       "/ config.data.eval_split (tfds syntax, e.g. 'train[:90%]').") from None
    if examples == 0:
      raise ValueError(f"Split {split!r} of dataset {name!r} selects no examples; fix "
                       "config.data.train_split / config.data.eval_split.")
  try:
    return _BytesText(builder.as_data_source(split))
  except NotImplementedError:  # Prepared as tfrecord (`tfds build`'s default).
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    raise ValueError(
        f"Dataset {name!r} in {data_dir} is prepared in the {fmt} file format, which "
        "cannot be read at random; bigjax reads array_record. Prepare it again with "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` (needs "
        "TensorFlow), or point config.data.data_dir at an array_record copy.") from None
