"""Orbax checkpoints: periodic async saves, keep-K, resume, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when the
save is complete, so a half-written checkpoint is never listed or restored;
`cleanup_tmp_directories` removes such leftovers when the manager opens.
"""
import logging
import os

import jax
import orbax.checkpoint as ocp

from bigjax.steps import TrainState


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": state.rng}


class Checkpointer:
  """The run's CheckpointManager under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.save_every = save_every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._leftovers = self._temporary_dirs()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    for d in self._leftovers:
      logging.warning("Ignored and removed an unfinished checkpoint: %s", d)

  def _temporary_dirs(self) -> list[str]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(d for d in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in d)

  @property
  def unfinished_removed(self) -> list[str]:
    return list(self._leftovers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
    """Saves if `step` is due (or forced); returns whether a save started.

    `step` is passed as a Python int so that the loop never waits on the device.
    """
    if not force and step % self.save_every:
      return False
    if step == self.latest_step():
      return False  # Already saved (e.g. a final save right after a periodic one).
    return self.manager.save(step, args=ocp.args.StandardSave(_as_dict(state)), force=True)

  def restore(self, abstract_state: TrainState, shardings: TrainState,
              step: int | None = None) -> TrainState:
    """Restores onto the given shardings, which may be a different mesh than the save's."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          _as_dict(abstract_state), _as_dict(shardings))
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return TrainState(**restored)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
