"""config.profile_steps: a jax.profiler trace of a window of steps in WORKDIR/profile."""
import glob
import os
import uuid

import pytest

from bigjax import config as config_lib, train
from configs import mlp


def _config(tmp_path, window):
  config = mlp.get_config("variant=binary,runlocal")
  config.data.data_dir = str(tmp_path / "data")
  config.update(total_steps=4, log_every=4, eval_every=4, checkpoint_every=4,
                profile_steps=window)
  return config


@pytest.mark.parametrize("window, traced", [((1, 3), "1..2"), ((2, 9), "2..4")],
                         ids=["inside the run", "past its end"])
def test_a_profiled_run_writes_a_trace(tmp_path, capsys, window, traced):
  workdir = tmp_path / "run"
  result = train.run(_config(tmp_path, window), str(workdir))
  assert int(result.state.step) == 4
  # A window past the run's end is cut there, and the message says so.
  assert f"Profile of steps {traced} written to" in capsys.readouterr().out
  traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert glob.glob(os.path.join(workdir, "profile", "**", "perfetto_trace.json.gz"),
                   recursive=True)


def test_a_profiled_run_summarizes_its_trace_by_kind_of_op(tmp_path, capsys, monkeypatch):
  """summary.txt beside the trace, its kinds in the log: every op of the train step
  found in its compiled HLO (no kind "?"), which nothing compiled again to get, and
  the window's steps counted (each op of this step without loops runs a whole
  number of times per step)."""
  import jax
  from jax._src import dispatch
  from bigjax import loop as loop_lib
  compiles, calls = [], []
  step_hlo = loop_lib.Loop.step_hlo
  # A compile, or (with a persistent compilation cache) a request that would be one.
  compile_events = (dispatch.BACKEND_COMPILE_EVENT,
                    "/jax/compilation_cache/compile_requests_use_cache")

  def counted(self):
    def listener(event, *args, **kwargs):
      if event in compile_events:
        compiles.append(event)
    jax.monitoring.register_event_listener(listener)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      calls.append(1)
      return step_hlo(self)
    finally:
      jax.monitoring.unregister_event_listener(listener)
      jax.monitoring.unregister_event_duration_listener(listener)
  monkeypatch.setattr(loop_lib.Loop, "step_hlo", counted)
  workdir = tmp_path / "run"
  train.run(_config(tmp_path, (2, 4)), str(workdir))
  assert calls == [1] and compiles == []
  out = capsys.readouterr().out
  assert "Profile, XLA op time by kind" in out and "(2 step(s) traced)" in out, out
  text = (workdir / "profile" / "summary.txt").read_text()
  kinds = [line.split()[0] for line in text.splitlines()[2:] if line.startswith("  ")
           and not line.startswith("  op ")]
  assert "matmul" in kinds and "?" not in kinds, text
  rows = text.split("\n  op ")[1].splitlines()[1:]
  assert rows, text
  for row in rows:
    runs_per_step = float(row.split()[2])
    assert runs_per_step >= 1 and runs_per_step == int(runs_per_step), row


def test_a_profiled_run_on_a_bucket_workdir_writes_its_trace_into_the_bucket(
    gcs_bucket, tmp_path):
  from etils import epath
  workdir = f"{gcs_bucket}/profiled-{uuid.uuid4().hex[:8]}"
  train.run(_config(tmp_path, (1, 3)), workdir)
  def files_under(path):  # (rglob refuses gs:// paths)
    return [f for p in path.iterdir() for f in (files_under(p) if p.is_dir() else [p])]
  files = files_under(epath.Path(workdir) / "profile")
  names = [p.name for p in files]
  assert any(n.endswith(".xplane.pb") for n in names), names
  assert "perfetto_trace.json.gz" in names, names
  assert all(p.stat().length > 0 for p in files)


def test_a_profile_that_fails_to_stop_is_said_and_the_run_goes_on(tmp_path, capsys,
                                                                   monkeypatch):
  """As when several processes' traces share a folder (the perfetto copy then
  raises): said in one line, stopped once, and the run trains to its end."""
  import jax
  stop = jax.profiler.stop_trace
  calls = []

  def failing():
    calls.append(1)
    stop()
    raise ValueError("Invalid trace folder")
  monkeypatch.setattr(jax.profiler, "stop_trace", failing)
  result = train.run(_config(tmp_path, (1, 3)), str(tmp_path / "run"))
  assert int(result.state.step) == 4 and len(calls) == 1
  assert ("Profile failed (ValueError: Invalid trace folder); training goes on."
          in capsys.readouterr().out)


def test_no_window_writes_no_trace(tmp_path):
  workdir = tmp_path / "run"
  train.run(_config(tmp_path, ()), str(workdir))
  assert not os.path.exists(workdir / "profile")


@pytest.mark.parametrize("window", [(3, 3), (4, 2), (-1, 2), (0, 2), (1,), (1, 2, 3),
                                    (1.0, 2)])
def test_bad_windows_are_refused(tmp_path, window):
  config = _config(tmp_path, ())
  config.profile_steps = window
  with pytest.raises(config_lib.ConfigError, match=r"config\.profile_steps: .*start < stop"):
    config_lib.validate(config, num_devices=8)


def test_the_window_counts_steps_as_metrics_rows_do_and_a_resume_inside_it_traces(
    tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = _config(tmp_path, (2, 4))
  config.update(total_steps=2, checkpoint_every=1)
  train.run(config, workdir)  # Ends at step 2, inside the window: traces step 2.
  assert "Profile of steps 2..2 written to" in capsys.readouterr().out
  config.total_steps = 4
  train.run(config, workdir)  # Resumes at 2: traces 3 (the window ends before 4).
  assert "Profile of steps 3..3 written to" in capsys.readouterr().out


def test_a_window_outside_the_run_is_said_at_the_start(tmp_path, capsys):
  train.run(_config(tmp_path, (6, 8)), str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert ("Note: profile_steps=(6, 8) lies outside the steps this run trains (1..4): no "
          "profile.") in out
  assert not os.path.exists(tmp_path / "run" / "profile")
