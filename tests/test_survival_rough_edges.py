"""Rough edges a new user hits: a damaged metrics.jsonl, a config file that does
not load, NaN sampling settings, rerunning a finished run with fewer steps, and a
checkpoints directory that cannot be written. Each gives one line saying what is
wrong and loses nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bigjax import generate, metrics
from bigjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("rough_edges")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, str(base / "data"))
  return str(base)


def _without_root_powers() -> list[str]:
  """A command prefix under which root obeys file permissions (as every other
  user does), so that a read-only directory is read-only in the test too."""
  if os.geteuid() != 0:
    return []
  if not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv: permissions cannot be made to bite")
  return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _main(workdir, *flags, config="configs/lm.py:runlocal", prefix=()):
  cmd = [*prefix, sys.executable, "-m", "bigjax.main", f"--config={config}",
         f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(shared_dir):
  """A runlocal run trained to its end (step 20, checkpoints 10 and 20)."""
  workdir = os.path.join(shared_dir, "finished")
  r = _main(workdir, f"--config.data.data_dir={shared_dir}/data")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _snapshot(workdir) -> dict:
  """The run's record: bytes of config.json and metrics.jsonl, and its checkpoints."""
  out = {name: open(os.path.join(workdir, name), "rb").read()
         for name in ("config.json", "metrics.jsonl")}
  out["checkpoints"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  return out


def test_rewind_reads_damaged_metrics_and_names_what_it_dropped(tmp_path):
  rows = [json.dumps({"step": s, "loss": 1.0}).encode() + b"\n" for s in range(1, 16)]
  damaged = rows[:3] + [b'{"step": 4, "loss": \xff\xfe}\n', b"not json\n"] + rows[3:]
  damaged[-1] = damaged[-1][:-5]  # The last row cut short by a kill.
  (tmp_path / "metrics.jsonl").write_bytes(b"".join(damaged))

  report = metrics.rewind_jsonl(str(tmp_path), 10)

  assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(rows[:10])
  assert (report.past_rows, report.unreadable, report.first_unreadable_line) == (4, 3, 4)
  first, second = report.messages(10)
  assert "dropped 4 row(s) after step 10" in first and "run again" in first
  assert "dropped 3 unreadable line(s)" in second and "line 4" in second
  assert "step" not in second.replace("with a step", "")  # Names no wrong step.


@pytest.mark.slow
def test_non_utf8_byte_in_metrics_does_not_stop_the_rerun(finished_run, shared_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "ab") as f:
    f.write(b'{"step": 21, "note": "\xff"}\n')
  r = _main(workdir, f"--config.data.data_dir={shared_dir}/data", "--config.total_steps=25")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "dropped 1 unreadable line(s)" in r.stdout, r.stdout
  steps = [row["step"] for row in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "loss" in row]
  assert steps == list(range(5, 26, 5))


@pytest.mark.parametrize("name, source, words", [
    ("missing.py", None, ["missing.py", "no such file"]),
    ("syntax.py", "def get_config(:\n", ["syntax.py line 1", "SyntaxError"]),
    ("raises.py", "def get_config(arg=None):\n  return {}['model']\n",
     ["raises.py line 2", "KeyError", "model"]),
])
def test_config_file_that_does_not_load_is_one_line(tmp_path, name, source, words):
  path = tmp_path / name
  if source is not None:
    path.write_text(source)
  r = _main(str(tmp_path / "run"), config=str(path))
  assert r.returncode == 1
  assert "Traceback" not in r.stderr and len(_lines(r.stderr)) == 1, r.stderr
  for word in words:
    assert word in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["temperature", "length_penalty"])
def test_generate_refuses_nan_settings(finished_run, setting):
  with pytest.raises(generate.GenerateError, match=f"--{setting}=nan"):
    generate.run(finished_run, "def ", max_new_tokens=4, **{setting: float("nan")})


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_so_and_keeps_its_record(finished_run, shared_dir):
  before = _snapshot(finished_run)
  data = f"--config.data.data_dir={shared_dir}/data"

  fewer = _main(finished_run, data, "--config.total_steps=10")
  assert fewer.returncode == 1
  assert len(_lines(fewer.stderr)) == 1 and "Traceback" not in fewer.stderr, fewer.stderr
  assert "config.total_steps: 10 is below step 20" in fewer.stderr
  assert _snapshot(finished_run) == before

  same = _main(finished_run, data, "--config.optim.lr=0.1")  # Another lr: not recorded.
  assert same.returncode == 0, same.stderr[-3000:]
  assert "Nothing to train" in same.stdout and "step 20" in same.stdout, same.stdout
  assert _snapshot(finished_run) == before


@pytest.mark.slow
def test_unwritable_checkpoints_dir_fails_before_training(shared_dir):
  workdir = os.path.join(shared_dir, "read_only_checkpoints")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  os.chmod(os.path.join(workdir, "checkpoints"), 0o555)
  r = _main(workdir, f"--config.data.data_dir={shared_dir}/data",
            prefix=_without_root_powers())
  assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
  assert "Traceback" not in r.stderr and len(_lines(r.stderr)) == 1, r.stderr
  assert os.path.join(workdir, "checkpoints") in r.stderr and "not writable" in r.stderr
  assert "step 5" not in r.stdout  # Nothing trained.
