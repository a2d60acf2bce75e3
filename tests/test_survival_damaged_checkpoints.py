"""Damaged checkpoints: a truncated or missing array file, a flipped byte. The
damaged step is reported in one line and set aside, the run resumes from the
step before it (and re-runs the lost steps with the same losses), and
`generate` uses the previous step; nothing good is deleted."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bigjax import generate
from bigjax.data import pipeline
from tests import checkpoint_damage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _main(workdir, data_dir, *flags):
  # A constant schedule: the learning rates of steps 11-20 do not depend on
  # total_steps, so a run extended to 30 repeats them with the same losses.
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.optim.schedule=constant", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished runlocal run: checkpoints at steps 10 and 20, one row per step."""
  base = tmp_path_factory.mktemp("damaged")
  data_dir = str(base / "data")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  workdir = str(base / "trained")
  r = _main(workdir, data_dir, "--config.log_every=1")
  assert r.returncode == 0, r.stderr[-3000:]
  return {"workdir": workdir, "data_dir": data_dir}


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], workdir)
  return workdir


def _step_dir(workdir, step) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


DAMAGE = {"truncated": checkpoint_damage.truncate, "deleted": os.remove,
          "flipped": checkpoint_damage.flip_byte}


def test_every_step_carries_checksums_of_its_files(trained):
  for step in (10, 20):
    step_dir = _step_dir(trained["workdir"], step)
    with open(os.path.join(step_dir, "bigjax_checksums.json")) as f:
      record = json.load(f)
    largest = checkpoint_damage.largest_file(step_dir)
    name = os.path.relpath(largest, step_dir)
    assert record["files"][name][0] == os.path.getsize(largest) and record["good"] is True


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _lines(text: str, word: str) -> list[str]:
  return [line for line in text.splitlines() if word in line]


def _assert_resumed_from_10(r, trained, workdir):
  """One line reports step 20, the run resumes from 10, re-runs 11-20 with the
  original losses and goes on to 30; the damaged step is kept aside."""
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  damaged = _lines(r.stdout, "is damaged")
  assert len(damaged) == 1 and "Checkpoint step 20 is damaged (" in damaged[0], r.stdout
  assert "Resumed from the checkpoint at step 10." in r.stdout
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "20"))
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.isdigit()) == [10, 20, 30]
  before, after = _losses(trained["workdir"]), _losses(workdir)
  assert sorted(after) == list(range(1, 31))
  for step in range(11, 21):
    assert after[step] == pytest.approx(before[step], rel=1e-6), step


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_array_file_falls_back_to_previous_step(trained, tmp_path, how):
  workdir = _copy(trained, tmp_path)
  DAMAGE[how](checkpoint_damage.largest_file(_step_dir(workdir, 20)))
  r = _main(workdir, trained["data_dir"], "--config.log_every=1", "--config.total_steps=30")
  _assert_resumed_from_10(r, trained, workdir)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_generate_uses_the_previous_step_when_one_is_damaged(trained, tmp_path, capsys, how):
  only_10 = _copy(trained, tmp_path / "only_10")
  shutil.rmtree(_step_dir(only_10, 20))
  want = generate.run(only_10, "def ", max_new_tokens=8)
  capsys.readouterr()

  workdir = _copy(trained, tmp_path / "damaged")
  DAMAGE[how](checkpoint_damage.largest_file(_step_dir(workdir, 20)))
  got = generate.run(workdir, "def ", max_new_tokens=8)
  notes = _lines(capsys.readouterr().err, "is damaged")
  assert got == want
  assert len(notes) == 1 and "checkpoint step 20" in notes[0], notes
  assert os.path.isdir(_step_dir(workdir, 20))  # Read-only: nothing moved.


def test_a_step_that_verifies_but_fails_to_read_is_left_in_place(trained, tmp_path,
                                                                  monkeypatch):
  """Reading a step whose files match their checksums fails for a reason outside
  it (here host memory; on a bucket, the network): nothing is moved and no
  metrics are dropped, and the same command resumes from that step once the
  cause is gone."""
  import orbax.checkpoint as ocp
  from bigjax import checkpoint, train
  from configs import lm

  workdir = _copy(trained, tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics_before = f.read()
  config = lm.get_config("runlocal")
  config.data.data_dir = trained["data_dir"]
  config.update(total_steps=30, log_every=1)
  config.optim.schedule = "constant"

  def out_of_memory(*args, **kwargs):
    raise MemoryError("host out of memory")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
  with pytest.raises(checkpoint.CheckpointReadError, match="step 20.*host out of memory"):
    train.run(config, workdir)
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.isdigit()) == ["10", "20"]
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == metrics_before
  r = _main(workdir, trained["data_dir"], "--config.log_every=1", "--config.total_steps=30")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from the checkpoint at step 20." in r.stdout
  assert sorted(_losses(workdir)) == list(range(1, 31))
