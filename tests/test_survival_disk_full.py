"""A checkpoint save that fails in the background (a full disk): noticed at the
next step boundary, reported in one line (what failed, where, the space a
checkpoint takes) naming the last good checkpoint; the rerun resumes from it.

The disk is filled by a file-size limit (RLIMIT_FSIZE) set in the run's process
just before the step-20 save: from then on writing a file past 64 KiB fails
(EFBIG, "File too large") as a full disk fails (ENOSPC). metrics.jsonl stays
below the limit; the checkpoint's data files do not."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from bigjax import checkpoint
from bigjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

_LIMITED = textwrap.dedent("""
    import resource, runpy, signal, sys
    from bigjax import checkpoint
    from_step, limit = int(sys.argv[1]), int(sys.argv[2])
    real_save = checkpoint.Checkpointer.save

    def save(self, step, *args, **kwargs):
      if step >= from_step:
        # The limit is per process: let the step-10 save finish writing first
        # (under load it may still be in flight), so only the step-20 save fails.
        self.wait_and_check()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the kernel kills us.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
      return real_save(self, step, *args, **kwargs)

    checkpoint.Checkpointer.save = save
    sys.argv = ["bigjax.main", *sys.argv[3:]]
    runpy.run_module("bigjax.main", run_name="__main__", alter_sys=True)
""")


def _flags(workdir, data_dir):
  return ["--config=configs/lm.py:runlocal", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.total_steps=40",
          "--config.log_every=1", "--config.eval_every=100"]


def _logged_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row["step"] for row in map(json.loads, f) if "loss" in row]


def test_failed_background_save_is_one_line_at_the_next_step_and_rerun_resumes(tmp_path):
  data_dir = str(tmp_path / "data")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  workdir = str(tmp_path / "run")

  full = subprocess.run([sys.executable, "-c", _LIMITED, "20", str(64 << 10),
                         *_flags(workdir, data_dir)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
  lines = [line for line in full.stderr.splitlines() if line.strip()]
  assert "Traceback" not in full.stderr and len(lines) == 1, full.stderr[-3000:]
  report = lines[0]
  assert report.startswith("Error: Saving the checkpoint at step 20 failed: "), report
  assert "File too large" in report and "20" + checkpoint.TMP_MARKER in report
  assert "a checkpoint takes about" in report and "MiB free there" in report
  assert "The last good checkpoint is step 10" in report
  # Noticed at the first step boundary after the background save gave up, and
  # at the latest before the next save: not one interval late, training on.
  assert max(_logged_steps(workdir)) <= 30
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert sorted(names) == ["10"]  # The unfinished save is gone; step 10 is kept.

  again = subprocess.run([sys.executable, "-m", "bigjax.main", *_flags(workdir, data_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from the checkpoint at step 10." in again.stdout
  assert _logged_steps(workdir) == list(range(1, 41))


def test_one_line_keeps_the_reason_of_a_real_tensorstore_write_error(tmp_path):
  """tensorstore appends its whole spec after the reason; opening a zarr array
  in an OCDBT database past the file-size limit gives the error the step-20
  save above can end with."""
  probe = textwrap.dedent("""
      import resource, signal, sys
      import tensorstore as ts
      from bigjax.checkpoint_errors import one_line
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
      spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "path": "step/",
              "base": "file://" + sys.argv[1]}}
      try:
        ts.open(spec, create=True, dtype=ts.float32, shape=[400]).result()
        text = "opened"
      except ValueError as e:
        text = str(e) + "\\n" + one_line(e, 200)
      resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
      print(text)
  """)
  # A long path, as pytest's are on CI, pushes the reason further out.
  out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ("d" * 80)) + "/"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  raw, short = out.stdout.strip().split("\n")
  assert "File too large" in raw and "tensorstore_spec" in raw, raw  # The real error.
  assert "File too large" in short and len(short) <= 205, short


@pytest.fixture
def small_disk(tmp_path):
  """A 24 MiB tmpfs: a real disk that fills (needs mount rights, else skipped)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("needs mount rights for a tmpfs")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)


_FILLED = textwrap.dedent("""
    import runpy, subprocess, sys
    from bigjax import checkpoint
    from_step, filler = int(sys.argv[1]), sys.argv[2]
    real_save = checkpoint.Checkpointer.save

    def save(self, step, *args, **kwargs):
      if step == from_step:
        self.wait_and_check()  # Step 10's save has landed; now the disk is full.
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
      return real_save(self, step, *args, **kwargs)

    checkpoint.Checkpointer.save = save
    sys.argv = ["bigjax.main", *sys.argv[3:]]
    runpy.run_module("bigjax.main", run_name="__main__", alter_sys=True)
""")


def test_a_full_disk_failing_every_write_is_one_line_and_its_unfinished_save_goes(
    tmp_path, small_disk):
  data_dir = str(tmp_path / "data")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  workdir = str(small_disk / "run")
  full = subprocess.run([sys.executable, "-c", _FILLED, "20", str(small_disk / "filler"),
                         *_flags(workdir, data_dir)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
  lines = [line for line in full.stderr.splitlines() if line.strip()]
  assert "Traceback" not in full.stderr and len(lines) == 1, full.stderr[-3000:]
  assert lines[0].startswith("Error: Saving the checkpoint at step 20 failed: "), lines[0]
  assert "No space left on device" in lines[0], lines[0]
  assert "The last good checkpoint is step 10" in lines[0], lines[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]


def _never_retrieved(filename: str) -> logging.LogRecord:
  """asyncio's record for a bare Future whose OSError was raised in `filename`."""
  code = compile("def write():\n  raise OSError(28, 'No space left on device')\n",
                 filename, "exec")
  namespace = {}
  exec(code, namespace)  # pylint: disable=exec-used
  try:
    namespace["write"]()
  except OSError as e:
    error = e
  return logging.LogRecord(
      "asyncio", logging.ERROR, "base_events.py", 1805,
      "Future exception was never retrieved\nfuture: <Future finished exception=%r>",
      (error,), (OSError, error, error.__traceback__))


@pytest.mark.parametrize("filename, dropped", [
    ("/site-packages/orbax/checkpoint/_src/path/async_path.py", True),
    ("/elsewhere/user_code.py", False)])
def test_an_orbax_writes_unretrieved_future_adds_no_traceback_after_the_one_line(
    filename, dropped):
  # On a full disk each of orbax's write futures fails; asyncio logs those never
  # retrieved when they are collected, after the failure was reported in one line.
  from bigjax import checkpoint_errors
  assert checkpoint_errors._orbax_task_never_retrieved(_never_retrieved(filename)) == dropped


def test_a_failed_save_whose_other_writes_still_land_is_reported_and_removed_at_close(
    tmp_path, monkeypatch):
  # orbax may still be writing the failed save's other files when the failure is
  # noticed: removing its directory then meets "Directory not empty". That is
  # not the failure to report; close, after every write ended, removes it.
  import errno
  import shutil
  import jax
  from bigjax import checkpoint_errors, checkpoint_integrity, steps

  def state(step):
    return steps.TrainState(step=jax.numpy.int32(step), params={"w": jax.numpy.full(64, step)},
                            opt_state={"count": jax.numpy.int32(step)},
                            rng=jax.random.PRNGKey(0))

  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, state(1))
  ckpt.wait_and_check()

  def full(step_dir, *, good):
    raise OSError(errno.ENOSPC, "No space left on device")

  real_rmtree, busy = shutil.rmtree, []

  def rmtree_while_writing(path, *args, **kwargs):
    if str(path).endswith("2" + checkpoint.TMP_MARKER) and not busy:
      busy.append(path)
      raise OSError(errno.ENOTEMPTY, "Directory not empty", "default" + checkpoint.TMP_MARKER)
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(checkpoint_integrity, "write", full)
  monkeypatch.setattr(shutil, "rmtree", rmtree_while_writing)
  ckpt.save(2, state(2))
  with pytest.raises(checkpoint_errors.CheckpointSaveError) as failure:
    ckpt.wait_and_check()
  ckpt.close()
  assert busy, "the failed save's directory was never removed"
  assert "No space left on device" in str(failure.value), failure.value
  assert "The last good checkpoint is step 1" in str(failure.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_a_failed_saves_late_writes_are_removed_and_only_their_logs_kept_quiet(tmp_path):
  # tensorstore's writes of a failed save outlive orbax's close: the directory
  # comes back, and orbax logs each failure's traceback, after the one-line report.
  import threading
  import time
  from etils import epath
  from bigjax import checkpoint_errors
  unfinished = tmp_path / ("20" + checkpoint.TMP_MARKER)

  def late_writes():
    for i in range(10):
      (unfinished / "d").mkdir(parents=True, exist_ok=True)
      (unfinished / "d" / str(i)).write_bytes(b"x")
      time.sleep(0.02)

  writer = threading.Thread(target=late_writes)
  writer.start()
  checkpoint._remove_once_writes_end(epath.Path(unfinished))
  writer.join()
  assert not unfinished.exists()

  catcher = checkpoint_errors.OrbaxErrorCatcher()
  catcher.abandoned = str(unfinished)

  def orbax_error(path):
    record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py",
                               1, "raised an exception", (), None)
    record.exc_info = (ValueError, ValueError(f"Error writing {path}/d/0"), None)
    return record

  assert not catcher.filter(orbax_error(unfinished))  # The failed save's: dropped.
  other = tmp_path / ("30" + checkpoint.TMP_MARKER)  # Another save's: for its catcher.
  assert catcher.filter(orbax_error(other))
  on_bucket = checkpoint_errors.OrbaxErrorCatcher()  # A bucket's step 2, not 20.
  on_bucket.abandoned = "gs://b/run/checkpoints/2"
  assert not on_bucket.filter(orbax_error("gs://b/run/checkpoints/2"))
  assert on_bucket.filter(orbax_error("gs://b/run/checkpoints/20"))

  # A later run in the directory (the same step may fail again) has its own catcher.
  catcher.abandoned = str(tmp_path / "checkpoints" / ("2" + checkpoint.TMP_MARKER))
  absl = logging.getLogger("absl")
  absl.addFilter(catcher)
  try:
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
    assert catcher not in absl.filters and ckpt._errors in absl.filters
    ckpt.close()
  finally:
    absl.removeFilter(catcher)
