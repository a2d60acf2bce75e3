"""The training loop and what it does between steps (hooks).

`run_loop` runs the jitted step from `loop.done` to config.total_steps on
prefetched batches and calls each hook around every step. What happens at a
log step, an eval step, a checkpoint step, on preemption or in a profiled
window is one hook each, below; train.run assembles the usual ones, and a
sweep, notebook or test can drive the same loop with its own list.

The host waits on the device only when a hook fetches a value (logging,
evaluating, saving); batch reading and its host-to-device copy run ahead on a
background thread (grain's thread prefetch), step-indexed as ever.
"""
import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from bigjax import checkpoint, metrics as metrics_lib, optim, paths, profile_summary, steps

PREFETCH_BATCHES = 2  # Global batches read (and copied to the devices) ahead.


class NonFiniteError(FloatingPointError):
  """A NaN/Inf loss or gradient under optim.nan_policy='halt'."""


@dataclasses.dataclass
class Loop:
  """What the hooks see and change: the state after `done` steps, the step
  metrics not yet fetched, the last evaluation, and whether to stop."""
  setup: steps.TrainSetup
  state: steps.TrainState
  done: int  # Steps finished: the next step to run.
  log: Callable[[str], None] = print
  writer: metrics_lib.MetricWriter | None = None  # Opened by LogMetrics.
  progress: metrics_lib.Progress | None = None  # Likewise.
  halt_on_nan: bool = False
  latest_checkpoint: Callable[[], int | None] = lambda: None
  # Metrics of the steps since the last row (on device): kept only for a reader,
  # LogMetrics (keep_pending) or the NaN check at saves (halt_on_nan); a loop
  # without either would hold every step's metrics for the whole run.
  pending: list = dataclasses.field(default_factory=list)
  keep_pending: bool = False
  last_metrics: dict = dataclasses.field(default_factory=dict)  # Of step `done` (on device).
  last_eval: dict = dataclasses.field(default_factory=dict)
  stop: bool = False
  preempted: bool = False
  # Resumed at a step whose evaluation metrics.jsonl lacks (set by LogMetrics).
  eval_lost: bool = False
  # The jitted train step run_loop runs, and the batch of step `done` (for step_hlo).
  train_step: Callable | None = None
  last_batch: Any = None

  @property
  def config(self):
    return self.setup.config

  def is_last(self) -> bool:
    return self.done == self.config.total_steps

  def every(self, n: int) -> bool:
    return self.done % n == 0 or self.is_last()

  def step_hlo(self) -> str:
    """The optimized HLO text of the train step as it runs. Lowered with the
    arguments it ran with, so jax's compilation cache answers: nothing compiles."""
    return self.train_step.lower(self.state, self.last_batch).compile().as_text()

  def check_finite(self):
    """optim.nan_policy='halt': NonFiniteError naming the first step whose
    loss or gradient norm in `pending` is not finite. Without a LogMetrics to
    read them, the steps checked are dropped."""
    if not self.halt_on_nan:
      return
    first = self.done - len(self.pending) + 1
    for i, m in enumerate(jax.device_get(self.pending)):
      loss, gnorm = float(m["loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        latest = self.latest_checkpoint()
        where = (f"the latest checkpoint, step {latest}, predates it, and rerunning resumes "
                 "there" if latest is not None else "no checkpoint was saved")
        raise NonFiniteError(
            f"Non-finite training step {first + i} (loss={loss}, grad_norm={gnorm}) with "
            f"config.optim.nan_policy='halt': the run stops ({where}). Lower optim.lr, set "
            "optim.clip_norm, check the data, or set config.optim.nan_policy='skip' to drop "
            "such updates.")
    if not self.keep_pending:
      self.pending = []


def untimed(loop: Loop, work: Callable[[], Any]):
  """work()'s result, its time left out of the logged throughput. The steps
  dispatched before it finish first: their time is training."""
  jax.block_until_ready(loop.state)
  start = time.perf_counter()
  try:
    return work()
  finally:
    if loop.progress is not None:
      loop.progress.exclude(time.perf_counter() - start)


def from_process_0(flag: bool) -> bool:
  """Process 0's `flag` on every process (only it reads metrics.jsonl)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class Hook:
  """Override what you need. `after_step` runs in list order; `close` always
  runs (also on errors), `finish` only when the loop ended without one."""

  def start(self, loop: Loop): ...
  def before_step(self, loop: Loop, step: int): ...
  def after_step(self, loop: Loop): ...
  def finish(self, loop: Loop): ...
  def close(self, loop: Loop): ...


def prefetched(setup: steps.TrainSetup, data: Any, start: int, stop: int):
  """Global batches start..stop-1 of `data` (.batch(step) -> this process's
  numpy rows), read and put on the devices PREFETCH_BATCHES ahead by a
  background thread. Closing the iterator stops the thread."""
  ds = grain.MapDataset.range(start, stop).map(data.batch)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).map(
      lambda local: global_batch(setup, local))
  return iter(grain.experimental.ThreadPrefetchIterDataset(
      ds, prefetch_buffer_size=PREFETCH_BATCHES))


def global_batch(setup: steps.TrainSetup, local: dict) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on batch."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding(), v)
          for k, v in local.items()}


def run_loop(loop: Loop, train_data, hooks: list[Hook]) -> Loop:
  """Trains from loop.done to config.total_steps (or until a hook stops it)."""
  train_step = loop.train_step = steps.make_train_step(loop.setup)
  batches = prefetched(loop.setup, train_data, loop.done, loop.config.total_steps)
  try:
    for hook in hooks:
      hook.start(loop)
    for step in range(loop.done, loop.config.total_steps):
      for hook in hooks:
        hook.before_step(loop, step)
      loop.last_batch = next(batches)
      loop.state, step_metrics = train_step(loop.state, loop.last_batch)
      if loop.keep_pending or loop.halt_on_nan:
        loop.pending.append(step_metrics)
      loop.last_metrics = step_metrics
      loop.done = step + 1
      for hook in hooks:
        hook.after_step(loop)
      if loop.stop:
        break
    for hook in hooks:
      hook.finish(loop)
  finally:
    batches.close()
    for hook in hooks:
      hook.close(loop)
  return loop


# --------------------------------------------------------------------------
# The usual hooks, in the order train.run lists them.
# --------------------------------------------------------------------------


class HoldWorkdir(Hook):
  """Stops the run before its next step once another run has taken its workdir,
  or could (a gs:// lease lost, or not renewed in time; bigjax/bucket_lease.py)."""

  def __init__(self, lock):
    self.lock = lock

  def before_step(self, loop, step):
    self.lock.check()

  def after_step(self, loop):
    # Again before the hooks after this one write: a step (the first one's
    # compilation) can outlast what is left of the lease.
    self.lock.check()


class LogMetrics(Hook):
  """Owns metrics.jsonl / TensorBoard and the progress bar: at the start the
  file is rewound to the resumed step and opened (after the rewind, which
  replaces the file); every config.log_every steps the window's mean metrics,
  the learning rate and the count of skipped updates are written. A row whose
  window is shorter (the first after a resume, the last of a run, a preemption's)
  says how many steps it averages, `steps_averaged`. Hooks that write
  (Evaluate) come after it in the list."""

  def __init__(self, workdir: str):
    self.workdir, self.skipped_logged = workdir, 0

  def start(self, loop):
    skipped = optim.skipped_updates(loop.state.opt_state)  # Before this (re)start.
    self.skipped_logged = 0 if skipped is None else int(jax.device_get(skipped))
    # A fresh start drops every row (-1), a resume the rows past its checkpoint.
    for message in metrics_lib.rewind_jsonl(self.workdir, loop.done or -1).messages(
        loop.done):
      loop.log(message)
    # A kill after a checkpoint landed, before that step's evaluation was written.
    loop.eval_lost = loop.done > 0 and not from_process_0(
        bool(metrics_lib.evaluation_at(self.workdir, loop.done)))
    items_per_step, unit = loop.setup.task.throughput(loop.config)
    loop.writer = metrics_lib.MetricWriter(self.workdir, resumed_at=loop.done)
    loop.keep_pending = True  # Its rows read them.
    loop.progress = metrics_lib.Progress(loop.config.total_steps, loop.done, items_per_step,
                                         unit)

  def close(self, loop):
    if loop.progress is not None:
      loop.progress.close()
    if loop.writer is not None:
      loop.writer.close()

  def after_step(self, loop):
    if loop.every(loop.config.log_every):
      self._write_row(loop)

  def finish(self, loop):
    # A hook stopped the loop between rows (a preemption save): the steps since
    # the last row are logged now; the process ends next and they would be lost.
    if loop.pending:
      self._write_row(loop)

  def _write_row(self, loop):
    loop.check_finite()
    fetched, loop.pending = jax.device_get(loop.pending), []
    scalars = {k: _mean_finite([m[k] for m in fetched]) for k in fetched[0]}
    if len(fetched) != loop.config.log_every:
      # Its means cover fewer steps than a row usually does (a resume starts a
      # window at the checkpoint's step), which a reader must be able to tell.
      scalars["steps_averaged"] = len(fetched)
    scalars["learning_rate"] = float(optim.applied_learning_rate(loop.state.opt_state))
    skipped = optim.skipped_updates(loop.state.opt_state)
    if skipped is not None:
      scalars["skipped_updates"] = skipped = int(jax.device_get(skipped))
      if skipped > self.skipped_logged:
        loop.log(f"step {loop.done}: skipped {skipped - self.skipped_logged} update(s) with "
                 f"non-finite gradients ({skipped} in total).")
      self.skipped_logged = skipped
    _, unit = loop.setup.task.throughput(loop.config)
    scalars[f"{unit}_per_s"] = loop.progress.update(loop.done, {"loss": scalars["loss"]})
    loop.writer.write(loop.done, scalars)


def evaluate(setup: steps.TrainSetup, eval_step, state, batches) -> dict:
  """The task's evaluation summary (eval_loss, eval_accuracy, ...) over `batches`."""
  sums = None
  for local in batches:
    out = eval_step(state.params, state.model_state, global_batch(setup, local))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return setup.task.eval_summary(jax.device_get(sums))


class Evaluate(Hook):
  """Every config.eval_every steps (and at the end): the task's summary of the
  eval batches. `baseline`: also before the first step (fine-tuning). At the
  start of a resumed run whose step's evaluation was lost (`loop.eval_lost`, a
  kill between the checkpoint and the evaluation), that evaluation again."""

  def __init__(self, eval_batches: list, baseline: bool = False):
    self.batches, self.baseline, self.eval_step = eval_batches, baseline, None

  def _run(self, loop, what: str):
    self.eval_step = self.eval_step or steps.make_eval_step(loop.setup)
    # Throughput counts training time only.
    loop.last_eval = untimed(loop, lambda: evaluate(loop.setup, self.eval_step, loop.state,
                                                    self.batches))
    loop.log(f"{what}: " + ", ".join(f"{k}={v:.4f}" for k, v in loop.last_eval.items()))
    if loop.writer is not None:
      loop.writer.write(loop.done, loop.last_eval)

  def start(self, loop):
    if self.baseline and loop.done == 0:
      self._run(loop, "eval of the loaded parameters (step 0)")
    elif loop.eval_lost and loop.every(loop.config.eval_every):
      self._run(loop, f"eval at step {loop.done} (again: the run stopped before writing it)")

  def after_step(self, loop):
    # Not after a preemption save: the grace period is short, and the rerun
    # evaluates this step (eval_lost).
    if loop.every(loop.config.eval_every) and not loop.stop:
      self._run(loop, f"eval at step {loop.done}")


class SaveCheckpoints(Hook):
  """Every config.checkpoint_every steps, at the end, and on preemption (a
  SIGTERM, or JAX's preemption sync under jax.distributed): a save; the loop
  stops after a preemption save has landed. A background save that failed
  stops the run at the next step."""

  def __init__(self, ckpt: checkpoint.Checkpointer, sigterm_raised: Callable[[], bool]):
    self.ckpt, self.sigterm_raised = ckpt, sigterm_raised

  def start(self, loop):
    loop.latest_checkpoint = self.ckpt.latest_step

  def before_step(self, loop, step):
    self.ckpt.raise_if_save_failed()

  def after_step(self, loop):
    # A preemption at the last step: the run is done, and ends as usual.
    stop = ((self.sigterm_raised() or self.ckpt.reached_preemption(loop.done))
            and not loop.is_last())
    if not (stop or loop.every(loop.config.checkpoint_every)):
      return
    loop.check_finite()  # No non-finite state is checkpointed under 'halt'.
    # A state whose loss is not finite may be broken: its saves must not rotate
    # out the newest good checkpoint (one host sync per save).
    good = math.isfinite(float(loop.last_metrics["loss"]))
    untimed(loop, lambda: self.ckpt.save(loop.done, loop.state, force=True, good=good))
    if stop:
      untimed(loop, self.ckpt.wait_and_check)  # An async save writes here.
      print(f"Preempted: checkpoint saved at step {loop.done}; rerun the same command to "
            "resume.", flush=True)
      loop.stop = loop.preempted = True

  def finish(self, loop):
    self.ckpt.wait_and_check()  # The last save, too, must have landed.


class Profile(Hook):
  """config.profile_steps = (start, stop): a jax.profiler trace of steps
  start..stop-1, numbered as metrics.jsonl numbers them (step N: the update
  after which N are done), into WORKDIR/profile: *.xplane.pb (TensorBoard's profile
  plugin, XProf) and perfetto_trace.json.gz (ui.perfetto.dev); each process of
  a multi-process job into WORKDIR/profile/process_<i> (the perfetto copy wants
  one trace per folder). On a bucket workdir the profiler writes to a local
  directory first (it writes through its own file layer, not the workdir's),
  copied into the bucket when the window closes. With the trace comes
  summary.txt (bigjax/profile_summary.py): the XLA ops' time per step by kind
  (matmul, attention, collective, ...) and the longest ops, whose kind table
  the log shows too. A profile that fails is said, and never stops the run; its
  time (the trace's writing, the summary) is left out of the logged throughput."""

  def __init__(self, workdir: str, start: int, stop: int):
    self.dir = epath.Path(workdir) / "profile"
    if jax.process_count() > 1:
      self.dir = self.dir / f"process_{jax.process_index()}"
    self.start_step, self.stop_step = start, stop
    self.tracing, self.first = False, None
    self.trace_dir = None  # Where the profiler writes: self.dir, or a local stand-in.

  def start(self, loop):
    first, last = loop.done + 1, loop.config.total_steps
    if self.stop_step <= first or self.start_step > last:
      loop.log(f"Note: profile_steps=({self.start_step}, {self.stop_step}) lies outside the "
               f"steps this run trains ({first}..{last}): no profile.")

  def before_step(self, loop, step):
    # A resumed run may start inside the window: it traces from its first step.
    if self.first is None and self.start_step <= step + 1 < self.stop_step:
      self.first = step + 1
      jax.block_until_ready(loop.state)  # The step before the window stays out of it.
      self.trace_dir = (self.dir if not paths.is_remote(self.dir)
                        else tempfile.mkdtemp(prefix="bigjax_profile_"))
      # The xplane.pb for TensorBoard / XProf, and a Perfetto-ready copy.
      jax.profiler.start_trace(str(self.trace_dir), create_perfetto_trace=True)
      self.tracing = True

  def after_step(self, loop):
    if self.tracing and loop.done == self.stop_step - 1:
      untimed(loop, lambda: self._stop(loop))

  def _stop(self, loop):
    jax.block_until_ready(loop.state)  # The traced steps' device work, whole.
    self.tracing = False  # Not stopped twice (close) if stopping fails.
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001  A profile never stops (or hides) the run's end.
      loop.log(f"Profile failed ({type(e).__name__}: {e}); training goes on.")
      return
    # The run may end (or fail) inside the window: name the steps traced.
    last = min(self.stop_step - 1, loop.done)
    self._summarize(loop, last - self.first + 1)
    if self.trace_dir != self.dir:
      try:
        for folder, _, names in os.walk(self.trace_dir):
          target = self.dir / os.path.relpath(folder, self.trace_dir)
          for name in names:
            epath.Path(folder, name).copy(target / name, overwrite=True)
      except Exception as e:  # noqa: BLE001  A profile never stops (or hides) the run's end.
        loop.log(f"Profile not copied to {self.dir} ({type(e).__name__}: {e}); it stays in "
                 f"{self.trace_dir}.")
        return
      shutil.rmtree(self.trace_dir)
    loop.log(f"Profile of steps {self.first}..{last} written to {self.dir}.")

  def _summarize(self, loop, traced_steps: int):
    """Writes summary.txt beside the trace and logs its table of kinds."""
    try:
      text = profile_summary.summarize(str(self.trace_dir), loop.step_hlo(), traced_steps)
      epath.Path(self.trace_dir, "summary.txt").write_text(text + "\n")
    except Exception as e:  # noqa: BLE001  A summary never stops the run.
      loop.log(f"Profile summary failed ({type(e).__name__}: {e}); the trace is kept.")
      return
    kinds = text.split("\n" + profile_summary.OPS_HEADER)[0]  # The longest ops stay in the file.
    loop.log(f"Profile, XLA op time by kind (the longest ops: {self.dir / 'summary.txt'}):\n"
             + kinds)

  def close(self, loop):
    if self.tracing:  # The run ended (or failed) inside the window.
      self._stop(loop)


def _mean_finite(values) -> float:
  """Mean over the finite values (skipped NaN steps don't poison the logged
  window); NaN if there are none."""
  arr = np.asarray(values, np.float64)
  finite = arr[np.isfinite(arr)]
  return float(finite.mean()) if finite.size else float("nan")
