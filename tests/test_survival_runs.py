"""Whole runs that get killed, preempted, resumed elsewhere: the CLI end to end.

One module-scoped reference run (8 devices, one process) is what every scenario
must reproduce:
- SIGKILL at an arbitrary step, then SIGTERM (preemption) of the resumed run, then
  a last rerun: same losses, bit for bit, with each step logged once;
- a 2-process × 4-device job (experiments/launch_multihost.py), preempted and
  resumed: the single-process losses, to float32 rounding;
- the reference's checkpoint resumed on 4 devices as data=2 × tensor=2;
- a checkpoint from another model: a clear error naming the arrays, before compiling;
- restoring and reading configs with pickle switched off.

Subprocesses share a persistent XLA compilation cache, so only the first of
each topology compiles.
"""
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigjax import checkpoint, config as config_lib, sharding, steps, train
from bigjax.data import pipeline
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 40
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Data dir (prepared once) and a shared compilation cache for subprocesses."""
  base = tmp_path_factory.mktemp("survival_runs")
  data_dir = str(base / "data")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  e = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  return {"base": base, "data_dir": data_dir, "env": e}


def _flags(env, workdir, *extra, checkpoint_every=4):
  # checkpoint_every does not change the numbers, only where a rerun can resume.
  return ["--config=configs/lm.py:runlocal", f"--workdir={workdir}",
          f"--config.data.data_dir={env['data_dir']}", f"--config.total_steps={TOTAL}",
          "--config.log_every=1", f"--config.checkpoint_every={checkpoint_every}",
          f"--config.eval_every={TOTAL}", "--config.keep_checkpoints=20", *extra]


def _start(env, workdir, *extra, launcher_args=None, devices=None, log_name="log.txt",
           checkpoint_every=4):
  os.makedirs(workdir, exist_ok=True)
  e = dict(env["env"])
  if devices:  # The suite's other XLA flags (tests/conftest.py) stay.
    e["XLA_FLAGS"] = " ".join([f for f in os.environ["XLA_FLAGS"].split()
                               if not f.startswith("--xla_force_host_platform_device_count")]
                              + [f"--xla_force_host_platform_device_count={devices}"])
  if launcher_args is None:
    cmd = [sys.executable, "-m", "bigjax.main",
           *_flags(env, workdir, *extra, checkpoint_every=checkpoint_every)]
  else:
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "launch_multihost.py"),
           *launcher_args, "--",
           *_flags(env, workdir, *extra, checkpoint_every=checkpoint_every)]
  log = open(os.path.join(workdir, log_name), "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  proc.log_path = log.name
  log.close()
  return proc


def _output(proc) -> str:
  with open(proc.log_path) as f:
    return f.read()


def _finish(proc, timeout=300) -> str:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("timed out:\n" + _output(proc)[-4000:])
  return _output(proc)


def _rows(workdir) -> list[dict]:
  """Complete rows of metrics.jsonl (a line a kill cut short is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        try:
          out.append(json.loads(line))
        except ValueError:
          pass
  return out


def _losses(workdir, key="loss") -> dict:
  """{step: value}; a step logged twice is an error (the file is rewound on resume)."""
  out = {}
  for r in _rows(workdir):
    if key in r:
      assert r["step"] not in out, f"step {r['step']} logged twice in {workdir}"
      out[r["step"]] = r[key]
  return out


def _wait_for(proc, predicate, what, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc={proc.returncode}) before {what}:\n"
                           + _output(proc)[-4000:])
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGKILL)
  raise AssertionError(f"timed out waiting for {what}:\n" + _output(proc)[-4000:])


def _max_step(workdir) -> int:
  return max((r["step"] for r in _rows(workdir) if "loss" in r), default=0)


def _checkpoints(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  done = sorted(int(n) for n in names if n.isdigit())
  return done, sorted(n for n in names if checkpoint.TMP_MARKER in n)


@pytest.fixture(scope="module")
def reference(env):
  """The uninterrupted run: 8 devices, one process."""
  workdir = str(env["base"] / "reference")
  out = _finish(_start(env, workdir))
  assert "Validation bits per byte" in out, out[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  return workdir


def test_sigkill_then_sigterm_then_rerun_is_bit_identical(env, reference):
  workdir = str(env["base"] / "interrupted")
  want = _losses(reference)

  # 1. SIGKILL at an arbitrary step (possibly in the middle of an async save).
  proc = _start(env, workdir, log_name="log_killed.txt")
  _wait_for(proc, lambda: _max_step(workdir) >= 9, "step 9")
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  killed_rows = {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}
  killed_at = max(killed_rows)
  assert killed_at < TOTAL, "the run finished before it could be killed"
  finished, unfinished = _checkpoints(workdir)
  assert all(s <= killed_at and s % 4 == 0 for s in finished)

  # 2. Rerun: resumes from the latest finished checkpoint; SIGTERM it (preemption).
  proc = _start(env, workdir, log_name="log_resumed.txt")
  _wait_for(proc, lambda: "Resumed from the checkpoint" in _output(proc) and
            _max_step(workdir) >= 22, "step 22 after resuming")
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, timeout=120)
  assert proc.returncode == 0, out[-4000:]
  resumed_from = int(re.search(r"Resumed from the checkpoint at step (\d+)", out).group(1))
  assert resumed_from == max(finished), (resumed_from, finished)
  if unfinished:  # The kill landed during a save: reported and removed.
    assert "Removed an unfinished checkpoint" in out and unfinished[0] in out
  preempted_at = int(re.search(r"Preempted: checkpoint saved at step (\d+)", out).group(1))
  assert 22 <= preempted_at < TOTAL
  finished, unfinished = _checkpoints(workdir)
  assert preempted_at in finished and not unfinished
  assert "Validation bits per byte" not in out  # A preempted run skips the summary.
  # The killed run's own rows past the checkpoint were already the reference's.
  for s in range(resumed_from + 1, killed_at + 1):
    assert killed_rows[s] == want[s], s

  # 3. Rerun again: resumes from the preemption checkpoint and finishes.
  proc = _start(env, workdir, log_name="log_final.txt")
  out = _finish(proc)
  assert proc.returncode == 0, out[-4000:]
  assert f"Resumed from the checkpoint at step {preempted_at}" in out
  got = _losses(workdir)  # Raises if any step was logged twice.
  assert sorted(got) == list(range(1, TOTAL + 1))
  assert got == want  # Bit-identical, steps before and after both interruptions.
  assert _losses(workdir, "eval_loss") == _losses(reference, "eval_loss")


def test_multihost_preempt_and_resume_matches_single_process(env, reference):
  workdir = str(env["base"] / "multihost")
  launcher = ["--num_processes=2", "--devices_per_process=4"]
  # Multi-process saves are slower (barriers); save rarely, the preemption forces one.
  proc = _start(env, workdir, launcher_args=launcher, log_name="log_1.txt",
                checkpoint_every=20)
  _wait_for(proc, lambda: _max_step(workdir) >= 6, "step 6")
  proc.send_signal(signal.SIGTERM)  # The launcher forwards it to both processes.
  out = _finish(proc, timeout=180)
  assert proc.returncode == 0, out[-4000:]
  assert "2 process(es)" in out
  stops = [int(s) for s in re.findall(r"Preempted: checkpoint saved at step (\d+)", out)]
  assert len(stops) == 2 and stops[0] == stops[1], out[-4000:]  # Both hosts, same step.
  assert stops[0] in _checkpoints(workdir)[0]

  proc = _start(env, workdir, launcher_args=launcher, log_name="log_2.txt",
                checkpoint_every=20)
  out = _finish(proc)
  assert proc.returncode == 0, out[-4000:]
  assert f"Resumed from the checkpoint at step {stops[0]}" in out
  got, want = _losses(workdir), _losses(reference)  # One writer: each step once.
  assert sorted(got) == list(range(1, TOTAL + 1))
  # Same global batches, same 8-device mesh; only cross-process reductions differ.
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-5)
  np.testing.assert_allclose(_losses(workdir, "eval_loss")[TOTAL],
                             _losses(reference, "eval_loss")[TOTAL], rtol=1e-5)


def test_multihost_ctrl_c_saves_a_checkpoint_on_every_process(env):
  # A terminal's Ctrl-C: SIGINT to the launcher's whole process group (_start makes
  # the launcher a group leader). The processes ignore the SIGINT itself and get
  # SIGTERM from the launcher, so they save as for a preemption instead of dying of
  # KeyboardInterrupt.
  workdir = str(env["base"] / "multihost_ctrl_c")
  proc = _start(env, workdir, launcher_args=["--num_processes=2", "--devices_per_process=4"],
                checkpoint_every=20)
  _wait_for(proc, lambda: _max_step(workdir) >= 2, "step 2")
  os.killpg(proc.pid, signal.SIGINT)
  out = _finish(proc, timeout=180)
  assert proc.returncode == 0, out[-4000:]
  assert "KeyboardInterrupt" not in out, out[-4000:]
  stops = [int(s) for s in re.findall(r"Preempted: checkpoint saved at step (\d+)", out)]
  assert len(stops) == 2 and stops[0] == stops[1], out[-4000:]  # Both hosts, same step.
  assert stops[0] in _checkpoints(workdir)[0]


# Imported by every Python process started with its folder on PYTHONPATH: process
# 0's metrics writes fail from step 3 on, as on a full disk.
FULL_DISK_ON_PROCESS_0 = """
import errno, os
if os.environ.get("BIGJAX_PROCESS_ID") == "0":
  from bigjax import metrics
  write = metrics.MetricWriter.write
  def failing(self, step, scalars):
    if step >= 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, step, scalars)
  metrics.MetricWriter.write = failing
"""


def test_multihost_failure_on_one_process_ends_the_job_at_once(env, tmp_path):
  """Its one-line error, exit 1, the others stopped by the launcher: not a hang in
  jax.distributed's shutdown barrier (minutes), then an abort (exit 134)."""
  (tmp_path / "sitecustomize.py").write_text(FULL_DISK_ON_PROCESS_0)
  faulty = dict(env, env=dict(env["env"], PYTHONPATH=os.pathsep.join(
      filter(None, [str(tmp_path), env["env"].get("PYTHONPATH")]))))
  workdir = str(tmp_path / "run")
  proc = _start(faulty, workdir, launcher_args=["--num_processes=2", "--devices_per_process=4"])
  out = _finish(proc, timeout=200)
  assert proc.returncode == 1, out[-4000:]
  assert "Error: writing in --workdir=" in out, out[-4000:]
  assert "failed (No space left on device)" in out, out[-4000:]
  # (The other process may report the lost coordinator before it is stopped.)
  assert "launch_multihost: a process exited with code 1; stopped the others." in out


def test_multihost_profile_writes_one_trace_per_process(env, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(env, workdir, "--config.total_steps=6", "--config.profile_steps=(3, 5)",
                launcher_args=["--num_processes=2", "--devices_per_process=4"])
  out = _finish(proc)
  assert proc.returncode == 0, out[-4000:]
  for p in range(2):
    traces = glob.glob(os.path.join(workdir, "profile", f"process_{p}", "**",
                                    "perfetto_trace.json.gz"), recursive=True)
    assert len(traces) == 1, (p, traces, out[-3000:])
    # Each process's summary: its train step's ops, the gradients' all-reduce among them.
    with open(os.path.join(workdir, "profile", f"process_{p}", "summary.txt")) as f:
      kinds = [line.split()[0] for line in f.read().split("\n  op ")[0].splitlines()[2:]]
    assert "collective" in kinds and "?" not in kinds, (p, kinds)


def test_cli_resumes_on_4_devices_as_data2_tensor2(env, reference):
  workdir = str(env["base"] / "four_devices")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(reference, "checkpoints", "32"),
                  os.path.join(workdir, "checkpoints", "32"))
  proc = _start(env, workdir, "--config.mesh.data=2", "--config.mesh.tensor=2", devices=4,
                checkpoint_every=20)
  out = _finish(proc)
  assert proc.returncode == 0, out[-4000:]
  assert "'data': 2" in out and "'tensor': 2" in out and "over 4 devices" in out
  assert "Resumed from the checkpoint at step 32" in out
  got, want = _losses(workdir), _losses(reference)
  assert sorted(got) == list(range(33, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-4)


def _in_process_config(env, **model):
  config = lm.get_config("runlocal")
  config.data.data_dir = env["data_dir"]
  config.update(total_steps=TOTAL, log_every=1, checkpoint_every=4, eval_every=TOTAL,
                keep_checkpoints=20)
  config.model.update(model)
  return config


def test_checkpoint_of_another_model_fails_clearly_before_compiling(env, reference,
                                                                    monkeypatch):
  workdir = str(env["base"] / "other_model")
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("tensorboard"))
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  for name in ("create_state", "make_train_step", "make_eval_step"):
    monkeypatch.setattr(steps, name, lambda *a, **k: pytest.fail("compiled something"))
  config = _in_process_config(env, emb_dim=128, mlp_dim=256)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    train.run(config, workdir)
  msg = str(e.value)
  assert f"checkpoint at step {TOTAL}" in msg
  assert re.search(r"params/\S+: shape \([^)]*\b64\b[^)]*\) in the checkpoint, "
                   r"\([^)]*\b128\b[^)]*\) in this run",
                   msg), msg
  assert "model.emb_dim: 64 in config.json, 128 now" in msg
  assert "model.mlp_dim: 128 in config.json, 256 now" in msg
  assert isinstance(e.value, config_lib.ConfigError)  # The CLI prints "Invalid config: ...".
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before  # The run's record of its config is kept.
  # Another optimizer (a different optimizer-state tree) is caught the same way.
  config = _in_process_config(env)
  config.optim.update(name="sgd", weight_decay=0.0)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="opt_state/.*not in this run"):
    train.run(config, workdir)


def test_restore_and_config_loading_never_unpickle(env, reference, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("pickle used")

  class Refusing(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
      refuse()

  for name in ("load", "loads"):
    monkeypatch.setattr(pickle, name, refuse)
  monkeypatch.setattr(pickle, "Unpickler", Refusing)

  # Config: the config file and the run's recorded config.json.
  from ml_collections.config_flags import config_flags  # The CLI's loader.
  config = config_flags.ConfigFileFlagParser("config").parse(
      os.path.join(ROOT, "configs", "lm.py") + ":runlocal")
  with open(os.path.join(reference, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["model"]["emb_dim"] == config.model.emb_dim
  # Data: the token cache is a plain .npy (np.load refuses object arrays).
  tokens = pipeline.token_array("stdlib_py", "train", env["data_dir"])
  assert tokens.dtype == np.uint16
  # Weights: the whole train state, restored onto this process's 8 devices.
  config = _in_process_config(env)
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh))
  ckpt = checkpoint.Checkpointer(reference, save_every=4, keep=20)
  state = ckpt.restore(setup.abstract_state, setup.state_shardings)
  ckpt.close()
  assert int(state.step) == TOTAL
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
