"""The training loop: one readable function, split by banner comments.

Data flows config -> mesh -> model/state -> jitted step -> checkpoint. The
batch at step k is a pure function of (seed, k, process), and step RNG is
fold_in(rng, step), so a resumed run needs nothing but the checkpointed state.

What a run survives (each tested in tests/test_survival_*.py):
- SIGKILL / crash: rerunning resumes from the latest finished checkpoint and
  repeats the lost steps bit-identically (same topology). metrics.jsonl is
  rewound to that checkpoint on resume, so it holds one row per step.
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
"""
import dataclasses
import json
import math
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import (checkpoint, config as config_lib, distributed, init_from,
                    metrics as metrics_lib, optim, sharding, steps, tasks, workdir_lock)


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _global_batch(setup: steps.TrainSetup, local: dict) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on batch."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding(), v)
          for k, v in local.items()}


def evaluate(setup, eval_step, state, batches) -> dict:
  """The task's evaluation summary (eval_loss, eval_accuracy, ...) over `batches`."""
  sums = None
  for local in batches:
    out = eval_step(state.params, state.model_state, _global_batch(setup, local))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return setup.task.eval_summary(jax.device_get(sums))


@dataclasses.dataclass
class RunResult:
  state: steps.TrainState
  setup: steps.TrainSetup
  eval_metrics: dict  # The last evaluation (empty if none ran).
  data_stats: dict = dataclasses.field(default_factory=dict)  # tasks.TaskData.stats
  preempted: bool = False
  already_finished: bool = False  # A rerun of a run already at config.total_steps.


class NonFiniteError(FloatingPointError):
  """A NaN/Inf loss or gradient under optim.nan_policy='halt'."""


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


def _check_finite(fetched: list, first_step: int, latest_checkpoint):
  """Raises NonFiniteError naming the first step whose loss or gradient norm is
  not finite (optim.nan_policy='halt')."""
  for i, m in enumerate(fetched):
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      where = (f"the latest checkpoint, step {latest_checkpoint}, predates it, and rerunning "
               "resumes there" if latest_checkpoint is not None else "no checkpoint was saved")
      raise NonFiniteError(
          f"Non-finite training step {first_step + i} (loss={loss}, grad_norm={gnorm}) with "
          f"config.optim.nan_policy='halt': the run stops ({where}). Lower optim.lr, set "
          "optim.clip_norm, check the data, or set config.optim.nan_policy='skip' to drop "
          "such updates.")


def _load_data(config) -> tasks.TaskData:
  """The task's data, this process's rows; data problems become DataErrors,
  raised before anything is compiled."""
  try:
    return tasks.get(config.task).load_data(config, jax.process_index(), jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.DataError(f"config.data: {e}") from e


def _model_config_diff(workdir: str, config) -> str:
  """' (model.emb_dim: 64 in WORKDIR/config.json, 128 now; ...)' or ''."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return ""
  new = json.loads(config.to_json_best_effort())
  diffs = []

  def walk(a, b, prefix):
    for k in sorted(set(a) | set(b)):
      x, y = a.get(k), b.get(k)
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f"{prefix}{k}.")
      elif x != y:
        diffs.append(f"{prefix}{k}: {x!r} in config.json, {y!r} now")

  walk(old.get("model", {}), new.get("model", {}), "model.")
  walk({"optim.name": old.get("optim", {}).get("name"),
        "optim.nan_policy": old.get("optim", {}).get("nan_policy")},
       {"optim.name": new["optim"].get("name"),
        "optim.nan_policy": new["optim"].get("nan_policy")}, "")
  return ("\nConfig fields that differ from the run's config.json: " + "; ".join(diffs)
          if diffs else "")


def run(config, workdir: str) -> RunResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps."""
  # --------------------------------------------------------------------------
  # Setup: join the other processes (if any), validate before compiling anything.
  # --------------------------------------------------------------------------
  distributed.initialize_from_env()
  config_lib.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count(), workdir=workdir)
  # Before anything is written: a second run on this workdir stops here.
  lock = workdir_lock.hold(workdir, log)
  sigterm = _SigtermFlag()  # From here on a SIGTERM means "save and stop".
  try:
    return _run(config, workdir, sigterm)
  finally:
    sigterm.restore()
    lock.release()


def _run(config, workdir: str, sigterm: _SigtermFlag) -> RunResult:
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es).")

  # --------------------------------------------------------------------------
  # Data: step-indexed batches, this process's rows only.
  # --------------------------------------------------------------------------
  data = _load_data(config)
  train_data, eval_data = data.train, data.eval
  setup = steps.make_setup(config, mesh, data.example_shape)

  # --------------------------------------------------------------------------
  # State: resume from the latest finished checkpoint, else initialise sharded.
  # --------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints,
                                 async_save=config.async_checkpoint)
  for name in ckpt.unfinished_removed:
    log(f"Removed an unfinished checkpoint (its save was interrupted): {name}")
  fine_tuning = bool(config.get("init_from") and config.init_from.get("workdir"))
  try:  # A damaged step is reported, set aside, and the one before it restored.
    restored = ckpt.restore_latest_intact(setup.abstract_state, setup.state_shardings, log)
  except checkpoint.CheckpointMismatchError as e:
    ckpt.close()
    raise checkpoint.CheckpointMismatchError(
        str(e) + _model_config_diff(workdir, config)) from None
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
  if start >= config.total_steps:
    ckpt.close()
    return _nothing_to_train(config, workdir, state, setup, start)
  # Recorded once the state fits: a mismatched rerun leaves the old config.json.
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  # A fresh start drops every row (-1), a resume the rows past its checkpoint.
  for message in metrics_lib.rewind_jsonl(workdir, start or -1).messages(start):
    log(message)
  train_step, eval_step = steps.make_train_step(setup), steps.make_eval_step(setup)
  writer = metrics_lib.MetricWriter(workdir)
  items_per_step, unit = setup.task.throughput(config)
  progress = metrics_lib.Progress(config.total_steps, start, items_per_step, unit)
  rate_key = f"{unit}_per_s"
  last_eval: dict = {}
  if start == 0 and fine_tuning:
    # A fine-tuning run's baseline: the loaded parameters on this run's eval data.
    last_eval = evaluate(setup, eval_step, state, eval_data)
    writer.write(0, last_eval)
    log("eval of the loaded parameters (step 0): " +
        ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
    progress.reset_clock()
  preempted = False
  halt_on_nan = optim.nan_policy(config.optim) == "halt"
  skipped_logged = None

  # --------------------------------------------------------------------------
  # Loop. The host waits on the device only when it logs, evaluates or saves.
  # --------------------------------------------------------------------------
  try:
    pending = []
    for step in range(start, config.total_steps):
      ckpt.raise_if_save_failed()  # A background save that failed stops the run here.
      batch = _global_batch(setup, train_data.batch(step))
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      done = step + 1
      log_now = done % config.log_every == 0 or done == config.total_steps
      stop = sigterm.raised or ckpt.reached_preemption(done)
      save_now = done % config.checkpoint_every == 0 or done == config.total_steps or stop

      if halt_on_nan and (log_now or save_now):
        # Checked before a save too, so that no non-finite state is checkpointed.
        _check_finite(jax.device_get(pending), done - len(pending) + 1, ckpt.latest_step())

      if log_now:
        fetched = jax.device_get(pending)
        pending = []
        scalars = {k: _mean_finite([m[k] for m in fetched]) for k in fetched[0]}
        scalars["learning_rate"] = float(steps.learning_rate(setup, done - 1))
        skipped = optim.skipped_updates(state.opt_state)
        if skipped is not None:
          scalars["skipped_updates"] = skipped = int(jax.device_get(skipped))
          if skipped_logged is not None and skipped > skipped_logged:
            log(f"step {done}: skipped {skipped - skipped_logged} update(s) with non-finite "
                f"gradients ({skipped} in total).")
          skipped_logged = skipped
        scalars[rate_key] = progress.update(done, {"loss": scalars["loss"]})
        writer.write(done, scalars)

      if done % config.eval_every == 0 or done == config.total_steps:
        last_eval = evaluate(setup, eval_step, state, eval_data)
        writer.write(done, last_eval)
        log(f"eval at step {done}: " + ", ".join(f"{k}={v:.4f}"
                                                 for k, v in last_eval.items()))
        progress.reset_clock()

      if save_now:
        # A state whose loss is not finite may be broken: its saves must not
        # rotate out the newest good checkpoint (one host sync per save).
        good = math.isfinite(float(step_metrics["loss"]))
        ckpt.save(done, state, force=True, good=good)
      if stop:
        ckpt.wait_and_check()
        print(f"Preempted: checkpoint saved at step {done}; rerun the same command to "
              "resume.", flush=True)
        preempted = True
        break
    ckpt.wait_and_check()  # The last save, too, must have landed.

  # --------------------------------------------------------------------------
  # Finish: every save completes before the process may exit (also on errors).
  # --------------------------------------------------------------------------
  finally:
    progress.close()
    ckpt.close()
    writer.close()
  return RunResult(state, setup, last_eval, data.stats, preempted)


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
      "further.")
  return RunResult(state, setup, {}, already_finished=True)


def _mean_finite(values) -> float:
  """Mean over the finite values (skipped NaN steps don't poison the logged
  window); NaN if there are none."""
  arr = np.asarray(values, np.float64)
  finite = arr[np.isfinite(arr)]
  return float(finite.mean()) if finite.size else float("nan")
