"""A training run: set-up, then the loop (bigjax/loop.py) with its usual hooks.

Data flows config -> mesh -> task data -> model/state (steps.py) -> loop ->
checkpoint. `prepare` does the set-up (validated config, data, state resumed or
initialised) and `run` adds the hooks (metrics, eval, checkpoints and
preemption, profile) and the loop; sweeps, notebooks and tests can call the
same pieces. The batch at step k is a pure function of (seed, k, process), and
step RNG is fold_in(rng, step), so a resumed run needs nothing but the
checkpointed state.

What a run survives (each tested: tests/test_survival_*.py, test_checkpoint_resume.py):
- SIGKILL / crash: rerunning resumes from the latest finished checkpoint and
  repeats the lost steps bit-identically (same topology). metrics.jsonl is
  rewound to that checkpoint on resume, so it holds each logged step (and
  each evaluation) once.
- SIGTERM (preemption): the step in flight finishes, a checkpoint is saved and
  waited for, a line says so, and run() returns (the CLI exits 0). Under
  jax.distributed every host stops at the same step (JAX's preemption sync).
- A save interrupted half-way: never listed; removed and reported on restart.
- A kill after a checkpoint landed but before that step's evaluation was
  written: the rerun evaluates that step again (at the final step, with the
  end-of-run report).
- A checkpoint whose files verify but cannot be read (memory, network):
  CheckpointReadError, nothing moved.
- A rerun with settings that still fit the checkpoint: the changes are told in
  one line and the earlier config.json kept beside the new one.
- A damaged checkpoint (truncated, missing or altered files: checksums; non-
  finite values): reported in one line, moved to WORKDIR/damaged_checkpoints,
  and the step before it resumed. The newest checkpoint of a good state (finite
  loss) is never rotated out by saves of one that is not.
- NaN/Inf gradients: skipped and counted, or the run halts (optim.nan_policy).
- A save that fails in the background (a full disk): CheckpointSaveError at the
  next step, in one line naming the last good checkpoint.
- Bad config, data or checkpoint: a ConfigError naming the field, before compiling.
- A second run on the same workdir: refused (WorkdirBusyError naming the holder).
  On gs:// the workdir is held by a lease object; a run whose lease another run
  took over (it had expired) stops before its next step.
"""
import dataclasses
import json
import signal
import sys
import threading

import jax
import tqdm
from etils import epath

from bigjax import (checkpoint, config as config_lib, distributed, init_from, loop as loop_lib,
                    metrics as metrics_lib, optim, recorded_config, sharding, steps, tasks,
                    workdir_lock)
from bigjax.checkpoint_errors import changed_fields, config_diff
from bigjax.models import zoo


def log(message: str):
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)  # Above the progress bar on a terminal, not glued to it.
    sys.stdout.flush()


@dataclasses.dataclass
class RunResult:
  state: steps.TrainState
  setup: steps.TrainSetup
  # The last evaluation (empty if none ran; a rerun of a finished run: its recorded one).
  eval_metrics: dict
  data_stats: dict = dataclasses.field(default_factory=dict)  # tasks.TaskData.stats
  preempted: bool = False
  already_finished: bool = False  # A rerun of a run already at config.total_steps.


class _SigtermFlag:
  """Single-process runs learn of SIGTERM here; multi-process runs rely on JAX's
  preemption sync (through orbax) so that every host stops at the same step."""

  def __init__(self):
    self.raised = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.raised = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def run(config, workdir: str) -> RunResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps."""
  # Join the other processes (if any), validate before compiling anything.
  distributed.initialize_from_env()
  distributed.check_same_config(config)  # Before validating: one bad copy stops all.
  config_lib.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count(), workdir=workdir)
  sigterm = _SigtermFlag()  # From here on a SIGTERM means "save and stop".
  try:
    p = prepare(config, workdir)
    try:
      return _run(config, workdir, sigterm, p)
    finally:  # Every save completes before the process may exit (also on errors).
      p.close()
  finally:
    sigterm.restore()


@dataclasses.dataclass
class Prepared:
  """A run ready to train: its data, setup, checkpointer and the state at `start`,
  holding its workdir until `close`."""
  data: tasks.TaskData
  setup: steps.TrainSetup
  ckpt: checkpoint.Checkpointer
  state: steps.TrainState
  start: int
  fine_tuning: bool
  lock: workdir_lock.WorkdirLock

  def close(self):
    """Waits for the save in flight, then lets the workdir go."""
    try:
      self.ckpt.close()
    finally:
      self.lock.release()


def prepare(config, workdir: str) -> Prepared:
  """Set-up for a validated config: the workdir held (a run already training in
  it is refused with WorkdirBusyError before anything is touched, such as its
  save in flight), mesh, the task's data (step-indexed, this process's rows),
  model and optimizer, and the state: resumed from the latest intact checkpoint,
  else initialised sharded (and loaded for fine-tuning). Call `close()` when done."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # A no-op in a bucket.
  lock = workdir_lock.hold(workdir, log)
  try:
    return _prepare(config, workdir, lock)
  except BaseException:
    lock.release()
    raise


def _prepare(config, workdir: str, lock: workdir_lock.WorkdirLock) -> Prepared:
  mesh = sharding.config_mesh(config)
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es).")
  for note in _notes(config):
    log("Note: " + note)
  data = _load_data(config)
  setup = steps.make_setup(config, mesh, data.example_shape)
  sharding.check_rows_per_process(setup.batch_sharding(), config.batch_size,
                                  jax.process_index(), jax.process_count())
  ckpt = checkpoint.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints,
                                 async_save=config.async_checkpoint)
  for name in ckpt.unfinished_removed:
    log(f"Removed an unfinished checkpoint (its save was interrupted): {name}")
  fine_tuning = bool(config.init_from.workdir)
  try:
    try:  # A damaged step is reported, set aside, and the one before it restored.
      restored = ckpt.restore_latest_intact(setup.abstract_state, setup.state_shardings, log)
    except checkpoint.CheckpointMismatchError as e:
      raise checkpoint.CheckpointMismatchError(
          str(e) + config_diff(workdir, config)) from None
    if restored is not None:
      state, start = restored
      log(f"Resumed from the checkpoint at step {start}.")
    else:
      state, start = steps.create_state(setup, config.seed), 0
      if fine_tuning:
        state, summary = init_from.load(config, setup, state)
        log(summary)
  except BaseException:
    ckpt.close()
    raise
  return Prepared(data, setup, ckpt, state, start, fine_tuning, lock)


def _notes(config) -> list[str]:
  """Settings that are valid but do something a researcher may not expect."""
  notes = []
  if config.optim.warmup_steps >= config.total_steps > 0:  # A shortened run, often.
    notes.append(f"optim.warmup_steps={config.optim.warmup_steps} >= total_steps="
                 f"{config.total_steps}: the learning rate rises for the whole run and never "
                 f"reaches optim.lr={config.optim.lr:g}. Lower optim.warmup_steps to change that.")
  if (config.grad_accum_steps > 1 and config.model.kind in zoo.KINDS
      and config.model.batch_norm):
    notes.append(f"grad_accum_steps={config.grad_accum_steps} with BatchNorm: each microbatch "
                 "is normalised by its own statistics, and the running averages move once "
                 "per microbatch, so the step is not one big batch's.")
  return notes


def usual_hooks(config, workdir: str, prepared: Prepared,
                sigterm_raised=lambda: False) -> list[loop_lib.Hook]:
  """Metrics (first: it opens the metrics file), checkpoints with preemption,
  eval, and the profile window."""
  # Saves before evaluating: under nan_policy='halt' a non-finite step stops the
  # run at a checkpoint step before anything of it is saved or evaluated.
  hooks = [loop_lib.LogMetrics(workdir),
           loop_lib.SaveCheckpoints(prepared.ckpt, sigterm_raised),
           loop_lib.Evaluate(prepared.data.eval, baseline=prepared.fine_tuning)]
  if config.profile_steps:
    hooks.append(loop_lib.Profile(workdir, *config.profile_steps))
  return hooks


def _run(config, workdir: str, sigterm: _SigtermFlag, p: Prepared) -> RunResult:
  if p.start >= config.total_steps:
    return _nothing_to_train(config, workdir, p)
  # Recorded once the state fits: a mismatched rerun leaves the old config.json.
  if jax.process_index() == 0:
    _record_config(config, workdir, p.start)
  loop = loop_lib.Loop(p.setup, p.state, p.start, log,
                       halt_on_nan=optim.nan_policy(config.optim) == "halt")
  hooks = [loop_lib.HoldWorkdir(p.lock), *usual_hooks(config, workdir, p, lambda: sigterm.raised)]
  loop_lib.run_loop(loop, p.data.train, hooks)
  return RunResult(loop.state, p.setup, loop.last_eval, p.data.stats, loop.preempted)


def _record_config(config, workdir: str, start: int):
  """Writes WORKDIR/config.json whole or not at all (a full disk must not leave it
  cut short). A run resumed with other settings (a longer schedule, another
  batch size or seed) says which, in one line, and keeps the config its earlier
  steps trained with as config.before_step_START.json."""
  path = epath.Path(workdir) / "config.json"
  text = config.to_json_best_effort(indent=2)
  # The config that trained steps 1..start: kept by an earlier resume at `start`
  # (whose settings then trained no step that was kept), else config.json.
  kept = path.parent / f"{recorded_config.KEPT_PREFIX}{start}.json"
  earlier = kept if kept.exists() else path
  if start > 0 and earlier.exists():
    old_text = earlier.read_text()
    try:
      # With the settings an older run predates filled in: they did not change.
      changed = changed_fields(recorded_config.fill_older(json.loads(old_text)),
                               json.loads(text))
    except ValueError:  # Not JSON: kept as it is, for the record.
      changed = [("config.json", "unreadable", "rewritten")]
    if changed:
      if earlier is path:
        metrics_lib.write_whole(kept, old_text)
      log(f"Resumed at step {start} with changed settings: " + "; ".join(
          f"{name}: {old!r} -> {new!r}" for name, old, new in changed) +
          f" (the earlier config is kept as {kept.name})." + _data_shift(changed, start))
  metrics_lib.write_whole(path, text)


def _data_shift(changed, start: int) -> str:
  """What a changed batch_size or seq_len does to the data a resumed run reads:
  step k's batch is the training stream's examples [k·B, (k+1)·B), a pure
  function of the step, not of what the earlier steps read."""
  changed = {name: (old, new) for name, old, new in changed}
  if "seq_len" in changed:
    return (" The changed seq_len cuts the corpus into other chunks: the resumed run "
            "reads another order than the earlier steps' (some chunks again, some never).")
  if "batch_size" not in changed:
    return ""
  old, new = changed["batch_size"]
  between = "skipped" if new > old else "read again"
  return (f" Step k reads the training stream from example k x batch_size, so this run "
          f"reads from example {start * new}, where batch_size {old} would have read from "
          f"{start * old}: the examples between are {between}.")


def _load_data(config) -> tasks.TaskData:
  """The task's data, this process's rows; data problems become DataErrors,
  raised before anything is compiled."""
  try:
    return tasks.get(config.task).load_data(config, jax.process_index(), jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.DataError(f"config.data: {e}") from e


def _nothing_to_train(config, workdir: str, p: Prepared) -> RunResult:
  """A rerun of a finished run, or one asking for fewer steps than the run has:
  says so and leaves the run's record (config.json, metrics.jsonl) as it is. A
  run killed after its last checkpoint landed but before its final evaluation
  was written gets that evaluation now (and the end-of-run report)."""
  if p.start > config.total_steps:
    raise config_lib.ConfigError(
        f"config.total_steps: {config.total_steps} is below step {p.start}, where the run "
        f"in {workdir} already is (its latest checkpoint); nothing was changed. Pass "
        f"--config.total_steps above {p.start} to train further, or use a new --workdir.")
  recorded = metrics_lib.evaluation_at(workdir, p.start)
  if not loop_lib.from_process_0(bool(recorded)):
    loop = loop_lib.run_loop(  # No steps: the hooks that redo the lost evaluation.
        loop_lib.Loop(p.setup, p.state, p.start, log),
        p.data.train, [loop_lib.LogMetrics(workdir), loop_lib.Evaluate(p.data.eval)])
    return RunResult(p.state, p.setup, loop.last_eval, p.data.stats)
  log(f"Nothing to train: the run in {workdir} already finished (its latest checkpoint is "
      f"at step {p.start} = config.total_steps). Pass a larger --config.total_steps to train "
      "further; a cosine or linear schedule is then laid out over the new total, so the "
      "learning rate at this step rises to what that schedule gives here.")
  # Its recorded final evaluation (process 0's; {} on the others), as a finished
  # run returns it: a notebook cell run twice reads the same result.
  return RunResult(p.state, p.setup, recorded, p.data.stats, already_finished=True)
