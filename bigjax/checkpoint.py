"""Orbax checkpoints: periodic async saves, keep-K, resume, restore onto any mesh.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it only
when the save is complete (on a bucket, which cannot rename, into `<step>/`, and
writes `commit_success.txt` last), so a half-written checkpoint (a process
killed during an async save) is never listed or restored. The Checkpointer removes such
leftovers when it opens and reports them (`unfinished_removed`); the previous
finished step is then the latest.

Restoring checks the checkpoint's shapes against the run's state first, so a
checkpoint from another model fails with a `CheckpointMismatchError` naming
the arrays that differ rather than deep inside orbax. Nothing is unpickled:
orbax stores arrays in tensorstore (zarr/OCDBT) and metadata as JSON.

Every save carries checksums of its files (checkpoint_integrity); a step that
does not read back as saved is set aside and the one before it restored, and a
save that fails in the background is reported at the next step (both in one
line: checkpoint_errors).
"""
import dataclasses
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bigjax import checkpoint_integrity as integrity, layer_layout, optim, paths
from bigjax.checkpoint_errors import (CheckpointDamagedError, CheckpointMismatchError,
                                      CheckpointReadError, CheckpointSaveError,
                                      OrbaxErrorCatcher, mib,
                                      one_line, quiet_abandoned_writes)
from bigjax.config import ConfigError
from bigjax.steps import TrainState

TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"  # A bucket's finished step holds it.
DAMAGED_DIR = "damaged_checkpoints"  # WORKDIR/damaged_checkpoints/STEP: set aside, kept.


def _remove_once_writes_end(path: epath.Path, quiet_s: float = 1.0, timeout_s: float = 30.0):
  """Removes a failed save's directory, again until it is gone quiet_s after a
  removal: its last writes may still be landing (a removal meets 'Directory not
  empty', or the directory comes back). A write later than that would leave it
  for the next run's start, which removes unfinished saves."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      path.rmtree(missing_ok=True)
    except OSError:
      pass
    time.sleep(quiet_s)
    if not path.exists() or time.monotonic() > deadline:
      return


def _bytes_under(path: epath.Path) -> int:
  return sum(p.stat().length for p in integrity.step_files(path).values())


def _everywhere(ok: bool) -> bool:
  """True if `ok` on every process, so that all of them take the same branch."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": state.rng, "model_state": state.model_state}


def shapes_by_name(tree) -> dict:
  """{'params/decoder/...': shape} for every leaf of a state or metadata tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optim.path_name(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def describe_mismatch(saved: dict, wanted: dict, limit: int = 4) -> list[str]:
  """Human-readable differences between two {path: shape} maps: arrays only in
  the checkpoint, only in this run, and with other shapes (parameters first,
  at most `limit` of each kind, then a count)."""
  order = {"step": 0, "params": 1, "model_state": 2, "opt_state": 3, "rng": 4}
  names = sorted(set(saved) | set(wanted), key=lambda n: (order.get(n.split("/")[0], 5), n))
  kinds = (
      ([n for n in names if n not in wanted],
       lambda n: f"{n}: in the checkpoint {saved[n]}, not in this run"),
      ([n for n in names if n not in saved],
       lambda n: f"{n}: in this run {wanted[n]}, not in the checkpoint"),
      ([n for n in names if n in saved and n in wanted and saved[n] != wanted[n]],
       lambda n: f"{n}: shape {saved[n]} in the checkpoint, {wanted[n]} in this run"),
  )
  out = []
  hint = layer_layout.layout_hint(saved, wanted)
  if hint:
    out.append(hint)
  for found, describe in kinds:
    out += [describe(n) for n in found[:limit]]
    if len(found) > limit:
      out.append(f"... and {len(found) - limit} more like it")
  return out


def absolute_workdir(workdir: str) -> str:
  return workdir if paths.is_remote(workdir) else os.path.abspath(workdir)


def _check_writable(directory: epath.Path):
  """A local checkpoints directory must be a writable directory; else the first
  save would fail deep inside orbax, after compiling and training."""
  path = str(directory)
  if paths.is_remote(path) or not os.path.lexists(path):
    return  # Remote: checked by the first write. Missing: created by the manager.
  if not os.path.isdir(path):
    raise ConfigError(f"--workdir: {path} is not a directory, so no checkpoint can be saved "
                      "there. Move it away, or use another --workdir.")
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir: {path} is not writable, so no checkpoint can be saved "
                      f"there. Fix its permissions (chmod u+rwx {path}), or use another "
                      "--workdir.")


@dataclasses.dataclass
class _KeepNewestGood:
  """An orbax preservation policy: keeps the newest finished checkpoint whose
  state was good, so that saves of a broken state (loss NaN) never rotate out
  the last checkpoint worth resuming. The others follow keep-K."""
  checkpointer: "Checkpointer"

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    keep = self.checkpointer.newest_good_step([info.step for info in checkpoints])
    return [info.step == keep for info in checkpoints]


class Checkpointer:
  """The run's CheckpointManager under WORKDIR/checkpoints.

  Every save records checksums of its files (checkpoint_integrity) once its
  arrays are written and before orbax renames it into place; restores verify
  them and the state's finiteness, and fall back past a damaged step.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.save_every = save_every
    self.directory = epath.Path(absolute_workdir(workdir)) / "checkpoints"
    _check_writable(self.directory)
    self._leftovers = self._remove_unfinished()
    self._async = async_save
    self._in_flight: tuple[int, bool] | None = None  # (step, good) of the last save.
    # The manager is always asynchronous: orbax runs the checksum hook only
    # there. A synchronous run waits for each save right away.
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep), _KeepNewestGood(self)]))
    # An explicit handler lets `item_metadata` read a checkpoint's shapes
    # before anything has been restored in this process.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(), options=options)
    self._good = {step: integrity.is_good(self.directory / str(step))
                  for step in self.all_steps()}
    self._unconfirmed: int | None = None  # A save not yet seen finished.
    self._failed = False  # A save failed: close ends quietly.
    self._abandoned: epath.Path | None = None  # A failed save's unfinished directory.
    self._state_bytes = 0
    self._errors = OrbaxErrorCatcher()
    absl = logging.getLogger("absl")
    for stale in [f for f in absl.filters if isinstance(f, OrbaxErrorCatcher)
                  and f.abandoned_under(self.directory)]:
      absl.removeFilter(stale)  # This run's own catcher covers its directory now.
    absl.addFilter(self._errors)
    quiet_abandoned_writes()

  def newest_good_step(self, steps: list[int] | None = None) -> int | None:
    """The newest finished step (of `steps`, default all) saved from a good
    state (`integrity.is_good`). The save in flight is not finished, so it
    never counts."""
    steps = self.all_steps() if steps is None else steps
    in_flight = self._in_flight[0] if self._in_flight else None
    return max((s for s in steps if s != in_flight and self._good.get(s, True)), default=None)

  def _record_checksums(self):
    """orbax's post-write hook (background thread, process 0): every file of the
    save is written; it is not yet renamed into place."""
    step, good = self._in_flight
    unfinished = self._unfinished(step)
    integrity.write(unfinished if unfinished.exists() else self.directory / str(step),
                    good=good)

  def _on_bucket(self) -> bool:
    return paths.is_bucket(self.directory)

  def _unfinished(self, step: int) -> epath.Path:
    """Where a save of `step` is written until it is finished."""
    return self.directory / (str(step) if self._on_bucket() else f"{step}{TMP_MARKER}")

  def _temporary_dirs(self) -> list[str]:
    if not self.directory.is_dir():
      return []
    if self._on_bucket():
      return sorted((p.name for p in self.directory.iterdir()
                     if p.name.isdigit() and not (p / COMMIT_MARKER).exists()), key=int)
    return sorted(p.name for p in self.directory.iterdir() if TMP_MARKER in p.name)

  def _remove_unfinished(self) -> list[str]:
    """Removes interrupted saves (process 0), so that they are gone, not merely
    ignored, by the time the manager opens; every process returns the list."""
    found = self._temporary_dirs()
    if found and jax.process_index() == 0:
      for name in found:
        logging.warning("Removing an unfinished checkpoint (its save was interrupted): %s",
                        self.directory / name)
        (self.directory / name).rmtree(missing_ok=True)
    if jax.process_count() > 1:  # Nobody opens the manager before the removal.
      multihost_utils.sync_global_devices("bigjax.checkpoint: unfinished removed")
    return found

  @property
  def unfinished_removed(self) -> list[str]:
    """Names of the unfinished checkpoint dirs found (and removed) on opening."""
    return list(self._leftovers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, *, force: bool = False,
           good: bool = True) -> bool:
    """Saves if `step` is due (or forced); returns whether a save started.

    `step` is passed as a Python int so that the loop never waits on the device.
    `good=False` (e.g. the loss was not finite) keeps the newest good checkpoint
    from being rotated out by this one.
    """
    if not force and step % self.save_every:
      return False
    if step == self.latest_step():
      return False  # Already saved (e.g. a final save right after a periodic one).
    self.wait_and_check()  # The hook reads _in_flight: one save at a time.
    self._errors.error = None  # Anything orbax logged before this save is not its failure.
    self._in_flight = (step, good)
    self._good[step] = good
    self._state_bytes = sum(x.nbytes for x in jax.tree.leaves(_as_dict(state)))
    try:
      started = self.manager.save(step, args=ocp.args.StandardSave(_as_dict(state)),
                                  force=True)
    except OSError as e:  # A synchronous part failed (creating the directory, ...).
      self._errors.error = e
      raise self._save_failure(step) from None
    self._unconfirmed = step
    if not self._async:
      self.wait_and_check()
    return started

  def raise_if_save_failed(self):
    """Cheap enough for every step: once the save in flight has ended, checks
    that it landed; else raises CheckpointSaveError, in one line."""
    if self._unconfirmed is None or self.manager.is_saving_in_progress():
      return
    self._wait()  # Returns at once (the save has ended), raising what it raised.
    step, self._unconfirmed = self._unconfirmed, None
    if self._errors.error is None and (self.directory / str(step) / integrity.CHECKSUMS).exists():
      return
    raise self._save_failure(step)

  def wait_and_check(self):
    """Waits for the save in flight, then raises if it failed."""
    self._wait()
    self.raise_if_save_failed()

  def _wait(self):
    """Waits for the save in flight; an exception it ended with is kept for the
    report (orbax re-raises it from the next wait or save)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore: ValueError, ...
      self._errors.error = self._errors.error or e

  def _save_failure(self, step: int) -> CheckpointSaveError:
    """What failed, where, how much space a checkpoint takes, and the step to
    resume from. The unfinished save is removed: it only takes space."""
    error, self._errors.error = self._errors.error, None
    unfinished = self._unfinished(step)
    # (On a bucket the step's directory is its final one: never remove a finished step.)
    self._failed = True
    if not (unfinished / COMMIT_MARKER).exists():
      self._abandoned = unfinished  # Writes still in flight may recreate it: see close.
      if jax.process_index() == 0:
        try:
          unfinished.rmtree(missing_ok=True)
        except OSError:  # The save's other writes may still be landing in it: see close.
          pass
    self.manager.reload()
    self._good.pop(step, None)
    finished = [s for s in self.all_steps() if s != step]
    need = _bytes_under(self.directory / str(finished[-1])) if finished else self._state_bytes
    space = f"a checkpoint takes about {mib(need)}"
    if not paths.is_remote(self.directory):
      space += f", {mib(shutil.disk_usage(str(self.directory)).free)} free there"
    what = one_line(error, 200) if error else "it did not finish"
    good = self.newest_good_step(finished)
    resume = (f"The last good checkpoint is step {good}: free some space (or use another "
              f"--workdir) and rerun the same command to resume from it." if good is not None
              else "No checkpoint was saved before it: a rerun starts from step 0.")
    return CheckpointSaveError(
        f"Saving the checkpoint at step {step} failed: {what} (writing {unfinished}; {space}). "
        + resume)

  def check_compatible(self, abstract_state: TrainState, step: int):
    """Raises CheckpointMismatchError if the checkpoint at `step` holds other
    arrays (names or shapes) than `abstract_state`. dtypes may differ: orbax
    casts on restore."""
    try:
      metadata = self.manager.item_metadata(step)
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointDamagedError(
          f"The checkpoint at step {step} in {self.directory} is unreadable ({one_line(e)}).",
          step, f"its metadata is unreadable: {one_line(e)}") from None
    if metadata is None:
      return  # Nothing to compare against; orbax checks while restoring.
    diffs = describe_mismatch(shapes_by_name(metadata), shapes_by_name(_as_dict(abstract_state)))
    if diffs:
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} was written by a "
          "different model or optimizer than this config describes:\n  " +
          "\n  ".join(diffs) + "\nResume with the config the checkpoint was written with "
          "(WORKDIR/config.json), or start this config in a new --workdir.")

  def restore(self, abstract_state: TrainState, shardings: TrainState,
              step: int | None = None) -> TrainState:
    """Restores onto the given shardings, which may be a different mesh than the save's."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
    self.check_compatible(abstract_state, step)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          _as_dict(abstract_state), _as_dict(shardings))
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return TrainState(**restored)

  def restore_latest_intact(self, abstract_state: TrainState, shardings: TrainState,
                            report) -> tuple[TrainState, int] | None:
    """(state, step) of the newest checkpoint that reads back as saved, restored
    onto `shardings`; None if there is no checkpoint. Each damaged step is
    reported in one line (`report`) and moved to WORKDIR/damaged_checkpoints, so
    that the run goes on from the previous good step and can save that step
    again. Raises CheckpointDamagedError if every step is damaged."""
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        return self._restore_intact(abstract_state, shardings, step), step
      except CheckpointDamagedError as e:
        aside = self._set_aside(step)
        self._good.pop(step, None)
        report(f"Checkpoint step {step} is damaged ({e.problem}); moved it to {aside} and "
               "falling back to the previous checkpoint.")
        damaged.append(step)
    if damaged:
      raise CheckpointDamagedError(
          f"No intact checkpoint in {self.directory}: steps {damaged} were damaged and moved "
          f"to {self.directory.parent / DAMAGED_DIR}. Rerun to start again from step 0, or "
          "put back good copies of those steps.")
    return None

  def _restore_intact(self, abstract_state: TrainState, shardings: TrainState,
                      step: int) -> TrainState:
    """`restore`, with a step that does not read back as saved raised as
    CheckpointDamagedError (another model's checkpoint is a mismatch, not damage).
    A step whose files verify against their checksums but fail to restore (host
    memory, the network, permissions) is not damaged: CheckpointReadError, and
    nothing is moved. Without checksums (an `unverified` step) nothing tells the
    two apart, and a failed read counts as damage."""
    # Checksums first (process 0 reads the files once), so that a damaged step
    # is never handed to orbax; then the restored values must be finite.
    step_dir = self.directory / str(step)
    problem, read_error = None, None
    if jax.process_index() == 0:
      try:
        problem = integrity.damage(step_dir)
      except OSError as e:
        read_error = e
    integrity.warn_if_unverified(step_dir)
    verified = _everywhere(not integrity.unverified(step_dir))
    state = None
    if _everywhere(problem is None and read_error is None):
      try:
        state = self.restore(abstract_state, shardings, step)
      except (CheckpointMismatchError, KeyboardInterrupt):
        raise
      except CheckpointDamagedError as e:
        problem = e.problem
      except Exception as e:  # pylint: disable=broad-except  # tensorstore: ValueError, ...
        if verified:
          read_error = e
        else:
          problem = f"reading it failed: {one_line(e)}"
    if not _everywhere(read_error is None):
      raise CheckpointReadError(
          f"Reading the checkpoint at step {step} in {self.directory} failed"
          f"{f' ({one_line(read_error)})' if read_error else ' on another process'}, but "
          "nothing shows it is damaged, so it was left in place. Fix the cause (host "
          "memory, the network, permissions) and rerun the same command to resume "
          "from it.") from read_error
    # The finiteness check is one program over the global state: every process
    # runs it (all restored) or none does.
    if _everywhere(problem is None):
      bad = integrity.first_nonfinite(_as_dict(state))
      problem = f"{bad} holds NaN or Inf" if bad else None
    if not _everywhere(problem is None):
      raise CheckpointDamagedError(f"step {step} is damaged", step,
                                   problem or "reading it failed on another process")
    return state

  def _set_aside(self, step: int) -> epath.Path:
    """Moves a damaged step out of the manager's sight, keeping its files."""
    aside_dir = self.directory.parent / DAMAGED_DIR
    aside = aside_dir / str(step)
    if jax.process_index() == 0:
      aside_dir.mkdir(parents=True, exist_ok=True)
      n = 1
      while aside.exists():
        aside, n = aside_dir / f"{step}-{n}", n + 1
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bigjax.checkpoint: set aside {step}")
    self.manager.reload()
    return aside

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any host got a preemption
    notice (SIGTERM), when running under jax.distributed; else False."""
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for the save in flight and closes; a failure is for `wait_and_check`
    (close runs on the way out of errors, which it must not hide)."""
    self._wait()
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      # orbax re-raises a failed save's other errors here (on a full disk every
      # write fails): that failure is being reported already, in one line.
      if not self._failed:
        raise
    finally:
      # A failed save's writes outlive manager.close (tensorstore's threads), and
      # orbax logs each one's traceback: the filter stays, for those only, until
      # another Checkpointer opens this directory.
      if self._abandoned is None:
        logging.getLogger("absl").removeFilter(self._errors)
      else:
        self._errors.abandoned = os.fspath(self._abandoned)
        if jax.process_index() == 0:
          _remove_once_writes_end(self._abandoned)
