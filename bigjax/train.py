"""The training loop: one readable function, split by banner comments.

Data flows config -> mesh -> model/state -> jitted step -> checkpoint. The
batch at step k is a pure function of (seed, k, process), and step RNG is
fold_in(rng, step), so a resumed run needs nothing but the checkpointed state.
"""
import dataclasses
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import checkpoint, config as config_lib, metrics as metrics_lib, sharding, steps
from bigjax.data import pipeline


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _global_batch(task: steps.Task, local: dict) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on batch."""
  return {k: jax.make_array_from_process_local_data(task.batch_sharding(v.ndim), v)
          for k, v in local.items()}


def evaluate(task, eval_step, params, batches) -> dict:
  sums = None
  for local in batches:
    out = eval_step(params, _global_batch(task, local))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  loss = float(sums["loss_sum"] / max(sums["weight_sum"], 1.0))
  return {"eval_loss": loss, "eval_accuracy": float(sums["correct_sum"] / sums["weight_sum"]),
          "eval_perplexity": math.exp(min(loss, 50.0)),
          # One token per byte (plus one EOS per document): nats/token -> bits/byte.
          "eval_bits_per_byte": loss / math.log(2)}


@dataclasses.dataclass
class RunResult:
  state: steps.TrainState
  task: steps.Task
  eval_metrics: dict  # The last evaluation (empty if none ran).
  preempted: bool = False


class _SigtermFlag:
  """Single-process runs learn of SIGTERM here; multi-process runs rely on JAX's
  preemption sync (through orbax) so that every host stops at the same step."""

  def __init__(self):
    self.raised = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.raised = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(config, workdir: str) -> RunResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps."""
  # --------------------------------------------------------------------------
  # Setup: validate before compiling anything, record the resolved config.
  # --------------------------------------------------------------------------
  config_lib.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count(), workdir=workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.mesh)
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es).")
  task = steps.make_task(config, mesh)

  # --------------------------------------------------------------------------
  # Data: step-indexed batches, this process's rows only.
  # --------------------------------------------------------------------------
  d = config.data
  task_name = "reverse" if config.model.kind == "encdec" else "lm"
  train_tokens = pipeline.token_array(d.dataset, d.train_split, d.data_dir, d.text_key)
  eval_tokens = pipeline.token_array(d.dataset, d.eval_split, d.data_dir, d.text_key)
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = pipeline.LMBatches(train_tokens, global_batch_size=config.batch_size,
                                  seq_len=config.seq_len, seed=config.seed, task=task_name,
                                  name=f"Split {d.train_split!r} of {d.dataset!r}", **shard)
  eval_data = list(pipeline.eval_batches(eval_tokens, global_batch_size=config.batch_size,
                                         seq_len=config.seq_len,
                                         num_batches=config.eval_batches, task=task_name,
                                         name=f"Split {d.eval_split!r} of {d.dataset!r}",
                                         **shard))

  # --------------------------------------------------------------------------
  # State: resume from the latest finished checkpoint, else initialise sharded.
  # --------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints,
                                 async_save=config.async_checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(task.abstract_state, task.state_shardings, start)
    log(f"Resumed from the checkpoint at step {start}.")
  else:
    state, start = steps.create_state(task, config.seed), 0
  train_step, eval_step = steps.make_train_step(task), steps.make_eval_step(task)
  writer = metrics_lib.MetricWriter(workdir)
  tokens_per_step = config.batch_size * config.seq_len
  progress = metrics_lib.Progress(config.total_steps, start, tokens_per_step)
  last_eval: dict = {}
  sigterm, preempted = _SigtermFlag(), False

  # --------------------------------------------------------------------------
  # Loop. The host waits on the device only when it logs or evaluates.
  # --------------------------------------------------------------------------
  pending = []
  for step in range(start, config.total_steps):
    batch = _global_batch(task, train_data.batch(step))
    state, step_metrics = train_step(state, batch)
    pending.append(step_metrics)
    done = step + 1

    if done % config.log_every == 0 or done == config.total_steps:
      fetched = jax.device_get(pending)
      pending = []
      scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      scalars["learning_rate"] = float(steps.learning_rate(task, done - 1))
      scalars["tokens_per_s"] = progress.update(done, {"loss": scalars["loss"]})
      writer.write(done, scalars)

    if done % config.eval_every == 0 or done == config.total_steps:
      last_eval = evaluate(task, eval_step, state.params, eval_data)
      writer.write(done, last_eval)
      log(f"eval at step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
      progress.reset_clock()

    ckpt.save(done, state, force=done == config.total_steps)
    if sigterm.raised or ckpt.reached_preemption(done):
      ckpt.save(done, state, force=True)
      ckpt.wait()
      print(f"Preempted: checkpoint saved at step {done}; rerun the same command to resume.",
            flush=True)
      preempted = True
      break

  # --------------------------------------------------------------------------
  # Finish: every save completes before the process may exit.
  # --------------------------------------------------------------------------
  progress.close()
  ckpt.close()
  writer.close()
  sigterm.restore()
  return RunResult(state, task, last_eval, preempted)
