"""A training run: set-up, then the loop (bigjax/loop.py) with its usual hooks.

Data flows config -> mesh -> task data -> model/state (steps.py) -> loop ->
checkpoint. `prepare` does the set-up (validated config, data, state resumed or
initialised) and `run` adds the hooks (metrics, eval, checkpoints and
preemption, profile) and the loop; sweeps, notebooks and tests can call the
same pieces. The batch at step k is a pure function of (seed, k, process), and
step RNG is fold_in(rng, step), so a resumed run needs nothing but the
checkpointed state.

What a run survives (each tested in tests/test_survival_*.py):
- SIGKILL / crash: rerunning resumes from the latest finished checkpoint and
  repeats the lost steps bit-identically (same topology). metrics.jsonl is
  rewound to that checkpoint on resume, so it holds each logged step (and
  each evaluation) once.
- SIGTERM (preemption): the step in flight finishes, a checkpoint is saved and
  waited for, a line says so, and run() returns (the CLI exits 0). Under
  jax.distributed every host stops at the same step (JAX's preemption sync).
- A save interrupted half-way: never listed; removed and reported on restart.
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
import signal
import threading

import jax
from etils import epath

from bigjax import (checkpoint, config as config_lib, distributed, init_from, loop as loop_lib,
                    optim, sharding, steps, tasks, workdir_lock)


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


@dataclasses.dataclass
class RunResult:
  state: steps.TrainState
  setup: steps.TrainSetup
  eval_metrics: dict  # The last evaluation (empty if none ran).
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
  config_lib.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count(), workdir=workdir)
  # Before anything is written: a second run on this workdir stops here.
  lock = workdir_lock.hold(workdir, log)
  sigterm = _SigtermFlag()  # From here on a SIGTERM means "save and stop".
  try:
    return _run(config, workdir, sigterm, lock)
  finally:
    sigterm.restore()
    lock.release()


@dataclasses.dataclass
class Prepared:
  """A run ready to train: its data, setup, checkpointer and the state at `start`."""
  data: tasks.TaskData
  setup: steps.TrainSetup
  ckpt: checkpoint.Checkpointer
  state: steps.TrainState
  start: int
  fine_tuning: bool


def prepare(config, workdir: str) -> Prepared:
  """Set-up for a validated config: mesh, the task's data (step-indexed, this
  process's rows), model and optimizer, and the state: resumed from the latest
  intact checkpoint, else initialised sharded (and loaded for fine-tuning)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # A no-op in a bucket.
  mesh = sharding.config_mesh(config)
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es).")
  data = _load_data(config)
  setup = steps.make_setup(config, mesh, data.example_shape)
  ckpt = checkpoint.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints,
                                 async_save=config.async_checkpoint)
  for name in ckpt.unfinished_removed:
    log(f"Removed an unfinished checkpoint (its save was interrupted): {name}")
  fine_tuning = bool(config.init_from.workdir)
  try:  # A damaged step is reported, set aside, and the one before it restored.
    restored = ckpt.restore_latest_intact(setup.abstract_state, setup.state_shardings, log)
  except checkpoint.CheckpointMismatchError as e:
    ckpt.close()
    raise checkpoint.CheckpointMismatchError(
        str(e) + checkpoint.config_diff(workdir, config)) from None
  except checkpoint.CheckpointDamagedError:
    ckpt.close()
    raise
  if restored is not None:
    state, start = restored
    log(f"Resumed from the checkpoint at step {start}.")
  else:
    state, start = steps.create_state(setup, config.seed), 0
    if fine_tuning:
      state, summary = init_from.load(config, setup, state)
      log(summary)
  return Prepared(data, setup, ckpt, state, start, fine_tuning)


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


def _run(config, workdir: str, sigterm: _SigtermFlag,
         lock: workdir_lock.WorkdirLock) -> RunResult:
  p = prepare(config, workdir)
  if p.start >= config.total_steps:
    p.ckpt.close()
    return _nothing_to_train(config, workdir, p.state, p.setup, p.start)
  # Recorded once the state fits: a mismatched rerun leaves the old config.json.
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  loop = loop_lib.Loop(p.setup, p.state, p.start, log,
                       halt_on_nan=optim.nan_policy(config.optim) == "halt")
  try:
    hooks = [loop_lib.HoldWorkdir(lock), *usual_hooks(config, workdir, p, lambda: sigterm.raised)]
    loop_lib.run_loop(loop, p.data.train, hooks)
  finally:  # Every save completes before the process may exit (also on errors).
    p.ckpt.close()
  return RunResult(loop.state, p.setup, loop.last_eval, p.data.stats, loop.preempted)


def _load_data(config) -> tasks.TaskData:
  """The task's data, this process's rows; data problems become DataErrors,
  raised before anything is compiled."""
  try:
    return tasks.get(config.task).load_data(config, jax.process_index(), jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.DataError(f"config.data: {e}") from e


def _nothing_to_train(config, workdir: str, state, setup, start: int) -> RunResult:
  """A rerun of a finished run, or one asking for fewer steps than the run has:
  says so and leaves the run's record (config.json, metrics.jsonl) as it is."""
  if start > config.total_steps:
    raise config_lib.ConfigError(
        f"config.total_steps: {config.total_steps} is below step {start}, where the run in "
        f"{workdir} already is (its latest checkpoint); nothing was changed. Pass "
        f"--config.total_steps above {start} to train further, or use a new --workdir.")
  log(f"Nothing to train: the run in {workdir} already finished (its latest checkpoint is "
      f"at step {start} = config.total_steps). Pass a larger --config.total_steps to train "
      "further; a cosine or linear schedule is then laid out over the new total, so the "
      "learning rate at this step rises to what that schedule gives here.")
  return RunResult(state, setup, {}, already_finished=True)
