"""Checkpoints restore exactly; re-running the same command resumes the step count."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bigjax import checkpoint, sharding, steps, tasks
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_save_restore_gives_identical_state(tmp_path):
  config = lm.get_config("runlocal")
  setup = steps.make_setup(config, sharding.make_mesh(dict(fsdp=4, tensor=2)))
  state = steps.create_state(setup, seed=3)
  toks = np.random.default_rng(0).integers(3, 259, (8, 33)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((8, 32), np.float32)}
  state, _ = steps.make_train_step(setup)(state, batch)  # Non-trivial Adam moments.
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  ckpt.save(1, state)
  ckpt.wait()
  restored = ckpt.restore(setup.abstract_state, setup.state_shardings)
  ckpt.close()
  want, got = jax.device_get(state), jax.device_get(restored)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.sharding == b.sharding


def _main(workdir, *overrides, env_extra=None):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
         f"--workdir={workdir}", *overrides]
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_rerun_resumes_from_latest_checkpoint(tmp_path):
  data_dir = str(tmp_path / "data")
  # A constant schedule after warmup, so that stopping at 7 then extending
  # total_steps to 12 sees the same learning rates as a straight 12-step run.
  common = [f"--config.data.data_dir={data_dir}", "--config.log_every=1",
            "--config.checkpoint_every=5", "--config.eval_every=100",
            "--config.optim.schedule=constant"]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  r = _main(straight, "--config.total_steps=12", *common)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _main(resumed, "--config.total_steps=7", *common)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["5", "7"]
  r = _main(resumed, "--config.total_steps=12", *common)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from the checkpoint at step 7" in r.stdout
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == list(range(1, 13))  # Each step logged once: 1..7, then 8..12.
  # Same data at each step and fold_in(rng, step) dropout: the resumed run continues
  # exactly where the uninterrupted one is.
  for step in range(8, 13):
    assert b[step] == pytest.approx(a[step], rel=1e-6), step
  assert os.path.exists(os.path.join(resumed, "loss_curve.png"))
  # The changed setting is told, and the earlier config kept for the record.
  assert ("Resumed at step 7 with changed settings: total_steps: 7 -> 12 (the earlier "
          "config is kept as config.before_step_7.json)." in r.stdout), r.stdout
  for name, total in (("config.json", 12), ("config.before_step_7.json", 7)):
    with open(os.path.join(resumed, name)) as f:
      assert json.load(f)["total_steps"] == total, name


def test_config_json_is_written_whole_or_not_at_all(tmp_path):
  """A write that fails part-way (a file-size limit standing in for a full disk)
  leaves the run's config.json as it was, not cut short."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"total_steps": 7}')
  script = textwrap.dedent(f"""
      import resource, signal
      from bigjax import train
      from configs import lm
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A failing write, not a killed process.
      config = lm.get_config("runlocal")
      resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # Below the config's size.
      train._record_config(config, {str(workdir)!r}, start=0)
  """)
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
  assert (workdir / "config.json").read_text() == '{"total_steps": 7}'


def _record(workdir, start: int, **settings):
  """What a (re)start at `start` writes as config.json, for lm.py:runlocal with `settings`."""
  from bigjax import train
  config = lm.get_config("runlocal")
  config.update(settings)
  train._record_config(config, str(workdir), start)


def test_config_that_trained_the_kept_steps_is_never_overwritten(tmp_path, capsys):
  """Resumed at step 7 with total_steps 12, killed before the next checkpoint, then
  resumed at 7 again with 20: config.before_step_7.json still holds the config
  that trained steps 1-7, and the change is told against it."""
  record = lambda total, start: _record(tmp_path, start, total_steps=total)
  record(7, 0)
  record(12, 7)
  record(20, 7)
  with open(tmp_path / "config.before_step_7.json") as f:
    assert json.load(f)["total_steps"] == 7
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["total_steps"] == 20
  assert capsys.readouterr().out.splitlines()[-1].startswith(
      "Resumed at step 7 with changed settings: total_steps: 7 -> 20 ")
  assert not list(tmp_path.glob("*.tmp"))


def test_resuming_with_another_batch_size_tells_which_examples_it_skips(tmp_path, capsys):
  """Step k reads the training stream from example k x batch_size on: a run resumed
  at step 7 with batch 16 instead of 8 starts at example 112, not 56."""
  from bigjax.data import pipeline

  record = lambda batch_size, start: _record(tmp_path, start, batch_size=batch_size)
  record(8, 0)
  record(16, 7)
  assert capsys.readouterr().out.splitlines()[-1].endswith(
      "Step k reads the training stream from example k x batch_size, so this run reads "
      "from example 112, where batch_size 8 would have read from 56: the examples "
      "between are skipped.")
  tokens = np.arange(16 * 8 * 4 + 1, dtype=np.uint16)  # Chunk i starts with token 4·i.
  read = lambda b: pipeline.LMBatches(tokens, global_batch_size=b, seq_len=4, seed=0,
                                      shuffle=False, examples=tasks.next_token_examples())
  assert read(16).batch(7)["inputs"][0, 0] == 4 * 112
  assert read(8).batch(6)["inputs"][-1, 0] == 4 * 55
  record(4, 14)
  assert capsys.readouterr().out.splitlines()[-1].endswith(
      "so this run reads from example 56, where batch_size 16 would have read from 224: "
      "the examples between are read again.")
