"""A kill after a checkpoint landed but before that step's evaluation was written
(the save finishes in the background while the evaluation runs): the rerun
evaluates that step again, so metrics.jsonl holds every evaluation once; at the
final step it also prints the end-of-run report and draws the loss curve."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _main(workdir, data_dir, *flags):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_data_dir):
  """runlocal to step 20: checkpoints and evaluations at steps 10 and 20."""
  workdir = str(tmp_path_factory.mktemp("lost_eval") / "run")
  r = _main(workdir, corpus_data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  return {"workdir": workdir, "data_dir": corpus_data_dir}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _evals(workdir) -> dict:
  evals = [r for r in _rows(workdir) if "eval_loss" in r]
  assert len({r["step"] for r in evals}) == len(evals), f"evaluated twice: {evals}"
  return {r["step"]: r["eval_loss"] for r in evals}


def _killed_before_evaluating(finished, tmp_path, step) -> str:
  """The workdir as a kill right after checkpoint `step` landed leaves it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished["workdir"], workdir)
  for later in os.listdir(os.path.join(workdir, "checkpoints")):
    if later.isdigit() and int(later) > step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", later))
  rows = [r for r in _rows(workdir) if r["step"] < step or (r["step"] == step and "loss" in r)]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.remove(os.path.join(workdir, "loss_curve.png"))
  return workdir


def test_resumed_run_evaluates_the_step_whose_evaluation_was_lost(finished, tmp_path):
  workdir = _killed_before_evaluating(finished, tmp_path, 10)
  assert 10 not in _evals(workdir)
  r = _main(workdir, finished["data_dir"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval at step 10 (again: the run stopped before writing it)" in r.stdout
  want = _evals(finished["workdir"])
  got = _evals(workdir)
  assert sorted(got) == [10, 20]
  for step in (10, 20):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_rerun_of_a_run_killed_before_its_final_evaluation_reports_it(finished, tmp_path):
  workdir = _killed_before_evaluating(finished, tmp_path, 20)
  r = _main(workdir, finished["data_dir"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Nothing to train" not in r.stdout
  assert "eval at step 20 (again" in r.stdout and "bits/byte" in r.stdout, r.stdout
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  assert _evals(workdir)[20] == pytest.approx(_evals(finished["workdir"])[20], rel=1e-6)


def test_rerun_of_a_finished_run_evaluates_nothing_again(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished["workdir"], workdir)
  r = _main(workdir, finished["data_dir"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Nothing to train" in r.stdout and "eval at step" not in r.stdout
  assert _rows(workdir) == _rows(finished["workdir"])
  # Nothing written: no TensorBoard event file either.
  assert sorted(os.listdir(os.path.join(workdir, "tensorboard"))) == sorted(
      os.listdir(os.path.join(finished["workdir"], "tensorboard")))
