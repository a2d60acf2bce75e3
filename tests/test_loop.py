"""The loop's pieces, driven from outside: train.prepare, then loop.run_loop
with a hook of one's own, against the jitted step called by hand."""
import time

import jax
import numpy as np
import pytest

from bigjax import loop, metrics, steps, train
from configs import mlp


class RecordLosses(loop.Hook):
  def __init__(self):
    self.losses = []

  def after_step(self, lp):
    self.losses.append(float(lp.last_metrics["loss"]))
    if lp.done == 5:
      lp.stop = True  # A hook ends the loop.


def test_run_loop_with_a_custom_hook_equals_the_step_by_hand(tmp_path):
  config = mlp.get_config("variant=binary,runlocal")
  config.data.data_dir = str(tmp_path / "data")
  config.total_steps = 8
  prepared = train.prepare(config, str(tmp_path / "run"))
  prepared.close()
  record = RecordLosses()
  lp = loop.run_loop(loop.Loop(prepared.setup, prepared.state, 0), prepared.data.train,
                     [record])
  assert lp.done == 5 and int(lp.state.step) == 5
  assert lp.pending == []  # No hook reads them: no step's metrics are held.

  # By hand: the same step on batch(0), batch(1), ... from a fresh state. The
  # prefetching thread must have fed the same batches, in order.
  setup, data = prepared.setup, prepared.data.train
  state, train_step = steps.create_state(setup, config.seed), steps.make_train_step(setup)
  want = []
  for step in range(5):
    state, metrics = train_step(state, data.batch(step))
    want.append(float(metrics["loss"]))
  assert record.losses == want
  for a, b in zip(jax.tree.leaves(jax.device_get(lp.state)),
                  jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_array_equal(a, b)


class LeaseExpiringAt:
  """A workdir lock whose lease is found expired at its `at`-th check."""

  def __init__(self, at: int):
    self.at, self.calls = at, 0

  def check(self):
    self.calls += 1
    if self.calls >= self.at:
      raise RuntimeError("lease expired")


def test_a_lease_lost_during_a_step_stops_the_run_before_the_hooks_after_it_write(tmp_path):
  """A step (the first one's compilation) can outlast what is left of a lease: the
  lock is checked again after the step, so no later hook (saving, logging) runs."""
  config = mlp.get_config("variant=binary,runlocal")
  config.data.data_dir = str(tmp_path / "data")
  prepared = train.prepare(config, str(tmp_path / "run"))
  prepared.close()
  record = RecordLosses()
  with pytest.raises(RuntimeError, match="lease expired"):
    loop.run_loop(loop.Loop(prepared.setup, prepared.state, 0), prepared.data.train,
                  [loop.HoldWorkdir(LeaseExpiringAt(2)), record])  # 1: before step 0.
  assert record.losses == []


def _config(tmp_path, **kw):
  config = mlp.get_config("variant=binary,runlocal")
  config.data.data_dir = str(tmp_path / "data")
  config.update({**dict(total_steps=12, log_every=4, eval_every=100, checkpoint_every=100), **kw})
  return config


class StopAt(loop.Hook):
  """Before SaveCheckpoints in the list: a preemption notice (or a crash) after step `at`."""

  def __init__(self, at: int, crash: bool = False):
    self.at, self.crash, self.raised = at, crash, False

  def after_step(self, lp):
    if lp.done == self.at:
      if self.crash:
        raise RuntimeError("simulated crash")
      self.raised = True


def _train(config, workdir, stop: StopAt | None = None) -> list[dict]:
  """train.run's loop and usual hooks (`stop` first); the training rows of
  metrics.jsonl (not the evaluation's)."""
  prepared = train.prepare(config, workdir)
  hooks = train.usual_hooks(config, workdir, prepared,
                            sigterm_raised=lambda: stop is not None and stop.raised)
  try:
    loop.run_loop(loop.Loop(prepared.setup, prepared.state, prepared.start),
                  prepared.data.train, ([stop] if stop else []) + hooks)
  finally:
    prepared.close()
  return [r for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r]


def test_rows_of_a_preempted_and_resumed_run_keep_every_step_and_say_how_many(tmp_path):
  """Preempted after step 7 (log_every=4): steps 5-7 get a row at the preemption,
  and the resumed run's first row, at 8, averages step 8 alone; both say so."""
  config = _config(tmp_path)
  straight = _train(config, str(tmp_path / "straight"))
  assert [r["step"] for r in straight] == [4, 8, 12]
  assert not any("steps_averaged" in r for r in straight)  # Full windows: unlabelled.

  workdir = str(tmp_path / "preempted")
  first = _train(config, workdir, StopAt(7))
  assert [(r["step"], r.get("steps_averaged")) for r in first] == [(4, None), (7, 3)]
  rows = {r["step"]: r for r in _train(config, workdir)}  # Resumes at the checkpoint of 7.
  assert [(s, r.get("steps_averaged")) for s, r in rows.items()] == [
      (4, None), (7, 3), (8, 1), (12, None)]
  want = {r["step"]: r for r in straight}
  assert rows[4]["loss"] == want[4]["loss"] and rows[12]["loss"] == want[12]["loss"]
  # Rows 7 and 8 together are the uninterrupted row 8: no step dropped or counted twice.
  joined = (3 * rows[7]["loss"] + rows[8]["loss"]) / 4
  assert joined == pytest.approx(want[8]["loss"], rel=1e-6)


def test_the_first_row_after_a_crash_says_it_averages_fewer_steps(tmp_path):
  """Crashed after step 7, checkpoint at 6: the rerun repeats step 7, and its
  row at 8 averages steps 7-8 only (the uninterrupted run's, steps 5-8)."""
  config = _config(tmp_path, checkpoint_every=6)
  workdir = str(tmp_path / "crashed")
  with pytest.raises(RuntimeError, match="simulated crash"):
    _train(config, workdir, StopAt(7, crash=True))
  rows = _train(config, workdir)
  assert [(r["step"], r.get("steps_averaged")) for r in rows] == [(4, None), (8, 2), (12, None)]


def _eval_steps(workdir) -> list[int]:
  return [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")
          if "eval_loss" in r]


def test_a_preemption_at_an_evaluation_step_saves_and_leaves_the_evaluation_to_the_rerun(
    tmp_path):
  config = _config(tmp_path, eval_every=4)
  workdir = str(tmp_path / "run")
  _train(config, workdir, StopAt(8))  # Grace time goes to the save alone.
  assert _eval_steps(workdir) == [4]
  _train(config, workdir)  # The rerun evaluates step 8 first (it was lost), then goes on.
  assert _eval_steps(workdir) == [4, 8, 12]


def test_a_preemption_at_the_last_step_ends_the_run_as_usual(tmp_path):
  config = _config(tmp_path, eval_every=4)
  workdir = str(tmp_path / "run")
  prepared = train.prepare(config, workdir)
  stop = StopAt(12)
  hooks = train.usual_hooks(config, workdir, prepared, sigterm_raised=lambda: stop.raised)
  try:
    done = loop.run_loop(loop.Loop(prepared.setup, prepared.state, 0), prepared.data.train,
                         [stop, *hooks])
  finally:
    prepared.close()
  # Not "preempted": nothing is left for a rerun, so this run prints its summary.
  assert not done.preempted and done.done == 12 and done.last_eval
  assert _eval_steps(workdir) == [4, 8, 12]


def test_evaluations_and_saves_are_left_out_of_the_throughput(tmp_path, monkeypatch):
  excluded = []
  monkeypatch.setattr(metrics.Progress, "exclude",
                      lambda self, seconds: excluded.append(seconds))
  real_evaluate, real_save = loop.evaluate, loop.checkpoint.Checkpointer.save

  def slow_evaluate(*args):
    time.sleep(0.3)
    return real_evaluate(*args)

  def slow_save(self, *args, **kwargs):
    time.sleep(0.3)
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(loop, "evaluate", slow_evaluate)
  monkeypatch.setattr(loop.checkpoint.Checkpointer, "save", slow_save)
  _train(_config(tmp_path, eval_every=6, checkpoint_every=4), str(tmp_path / "run"))
  # Evaluations at 6 and 12, saves at 4, 8 and 12: each one's time taken out.
  assert len(excluded) == 5 and min(excluded) >= 0.3, excluded


def test_a_preemption_row_leaves_out_the_wait_for_its_save(tmp_path, monkeypatch):
  # Saves are asynchronous: at a preemption the write happens in wait_and_check.
  excluded = []
  monkeypatch.setattr(metrics.Progress, "exclude",
                      lambda self, seconds: excluded.append(seconds))
  real_wait = loop.checkpoint.Checkpointer.wait_and_check

  def slow_wait(self):
    time.sleep(0.3)
    return real_wait(self)

  monkeypatch.setattr(loop.checkpoint.Checkpointer, "wait_and_check", slow_wait)
  _train(_config(tmp_path), str(tmp_path / "run"), StopAt(7))
  # The preemption's save (which waits for any save before it) and its wait.
  assert len(excluded) == 2 and min(excluded) >= 0.3, excluded


def _events(path):
  """The Event protos of one TensorBoard event file (TFRecord framing: length,
  its CRC, the bytes, their CRC)."""
  import struct

  from tensorboardX.proto import event_pb2
  data, out, at = path.read_bytes(), [], 0
  while at < len(data):
    (n,) = struct.unpack("<Q", data[at:at + 8])
    out.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
    at += 12 + n + 4
  return out


def test_tensorboard_is_told_to_purge_the_points_a_resume_repeats(tmp_path):
  """A run that crashed after step 10 and resumed from its step-5 checkpoint. Its
  new event file starts with TensorBoard's purge marker at step 6 (SessionLog
  START: TensorBoard then drops the earlier file's points from step 6 on, as
  metrics.jsonl is rewound); a fresh run's at step 0 (an earlier attempt without a
  checkpoint left nothing to keep)."""
  from tensorboardX.proto import event_pb2

  first = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 11):
    first.write(step, {"loss": 1.0 * step})
  first.close()
  (first_file,) = list((tmp_path / "tensorboard").iterdir())
  time.sleep(1.1)  # Event files are named by the second they were opened in.
  rerun = metrics.MetricWriter(str(tmp_path), enabled=True, resumed_at=5)
  for step in range(6, 9):
    rerun.write(step, {"loss": -1.0 * step})
  rerun.close()
  (second_file,) = set((tmp_path / "tensorboard").iterdir()) - {first_file}
  start = event_pb2.SessionLog.START
  assert [e.step for e in _events(first_file) if e.session_log.status == start] == [0]
  marks = [e.step for e in _events(second_file) if e.session_log.status == start]
  assert marks == [6]
  assert [(e.step, e.summary.value[0].simple_value) for e in _events(second_file)
          if e.summary.value] == [(s, -float(s)) for s in range(6, 9)]


def test_tensorboard_points_are_on_disk_with_their_metrics_row(tmp_path):
  """Before the writer closes (a kill): the resumed run purges only past its
  checkpoint, so points still in a buffer would be lost for good."""
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in (5, 10):
    writer.write(step, {"loss": 1.0 * step})
  (events_file,) = list((tmp_path / "tensorboard").iterdir())
  assert [(e.step, e.summary.value[0].simple_value) for e in _events(events_file)
          if e.summary.value] == [(5, 5.0), (10, 10.0)]
  writer.close()


def test_the_progress_bar_shows_the_row_it_was_drawn_for(monkeypatch):
  """On a terminal: the figures set before the bar is drawn, not the last row's."""
  import io

  class Terminal(io.StringIO):
    def isatty(self):
      return True
  screen = Terminal()
  monkeypatch.setattr("sys.stderr", screen)
  progress = metrics.Progress(total=20, initial=0, tokens_per_step=10)
  for step, loss in ((5, 1.5), (10, 2.5)):
    time.sleep(0.15)  # Past tqdm's minimum interval between draws.
    progress.update(step, {"loss": loss})
    drawn = screen.getvalue().rsplit("\r", 1)[-1]
    assert f"{step}/20" in drawn and f"loss={loss}" in drawn, drawn
  progress.close()
