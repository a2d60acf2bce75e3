"""A read-only view of a run's checkpoints, for `generate`, fine-tuning
(init_from) and tables of results: it never saves, deletes or cleans up, so it
is safe on a run that is still training. A damaged step is reported and
skipped, never moved."""
import contextlib
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath

from bigjax import checkpoint_integrity as integrity, optim
from bigjax.checkpoint import absolute_workdir, describe_mismatch, shapes_by_name
from bigjax.checkpoint_errors import CheckpointDamagedError, CheckpointMismatchError, one_line
from bigjax.steps import TrainState


@contextlib.contextmanager
def _quiet_absl():
  """orbax logs a warning for each option read_only overrides, and that the
  directory is read-only: both are the point here."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class CheckpointReader:
  """A read-only view of a run's checkpoints: it never saves, deletes or cleans
  up, so it is safe on a run that is still training (an unfinished save is
  simply not listed). Restores any subset of the saved tree: for serving
  (parameters without optimizer state) and for fine-tuning (init_from)."""

  def __init__(self, workdir: str):
    self.directory = epath.Path(absolute_workdir(workdir)) / "checkpoints"
    if not self.directory.is_dir():
      raise FileNotFoundError(f"{workdir} has no checkpoints directory ({self.directory}).")
    with _quiet_absl():
      self.manager = ocp.CheckpointManager(
          self.directory, item_handlers=ocp.PyTreeCheckpointHandler(),
          options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                               create=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metadata(self, step: int) -> dict:
    """The saved tree ('params', 'opt_state', ...) of shape/dtype metadata."""
    tree = self.manager.item_metadata(step)
    return dict(getattr(tree, "tree", tree))

  def restore(self, step: int, targets: dict) -> dict:
    """Restores the leaves named in `targets` ({'params/a/b': ShapeDtypeStruct
    with a sharding}); the rest of the tree is not read."""
    def target(path, leaf):
      return targets.get(optim.path_name(path), ocp.PLACEHOLDER)

    item = jax.tree_util.tree_map_with_path(target, self.metadata(step))
    restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
    return {optim.path_name(p): leaf for p, leaf in
            jax.tree_util.tree_flatten_with_path(restored)[0] if leaf is not ocp.PLACEHOLDER}

  def restore_params(self, abstract_state: TrainState, shardings: TrainState,
                     step: int | None = None) -> tuple:
    """(params, model_state) of `step` (default: the latest) onto the given
    shardings, checked against the run's shapes first; no optimizer state is read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
    wanted = {"params": abstract_state.params, "model_state": abstract_state.model_state}
    saved = self.metadata(step)
    diffs = describe_mismatch(shapes_by_name({k: saved.get(k, {}) for k in wanted}), shapes_by_name(wanted))
    if diffs:
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} holds another model's "
          "parameters than this config describes:\n  " + "\n  ".join(diffs) +
          "\nUse the config the checkpoint was written with (WORKDIR/config.json).")
    shard = {"params": shardings.params, "model_state": shardings.model_state}
    targets = {optim.path_name(p): jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
               for (p, a), s in zip(jax.tree_util.tree_flatten_with_path(wanted)[0],
                                    jax.tree.leaves(shard))}
    flat = self.restore(step, targets)
    leaves = [flat[optim.path_name(p)] for p, _ in jax.tree_util.tree_flatten_with_path(wanted)[0]]
    out = jax.tree.unflatten(jax.tree.structure(wanted), leaves)
    return out["params"], out["model_state"]

  def restore_latest_intact_params(self, abstract_state: TrainState, shardings: TrainState,
                                   report) -> tuple:
    """(params, model_state, step) of the newest step that reads back as saved.
    A damaged step is reported in one line (`report`) and skipped, never moved:
    the reader is read-only. Raises CheckpointDamagedError if none is intact."""
    problems = []
    for step in reversed(self.all_steps()):
      problem = self._problem(abstract_state, shardings, step)
      if isinstance(problem, str):
        report(f"Note: checkpoint step {step} in {self.directory} is damaged ({problem}); "
               "trying the previous one.")
        problems.append(f"step {step}")
        continue
      params, model_state = problem
      return params, model_state, step
    raise CheckpointDamagedError(
        f"No intact checkpoint in {self.directory}: {', '.join(problems) or 'none'} damaged. "
        "Wait for the run's next save, or put back a good copy of a step.")

  def _problem(self, abstract_state, shardings, step: int):
    """(params, model_state) of `step` if it reads back as saved, else a few
    words saying what is wrong with it."""
    try:
      problem = integrity.damage(self.directory / str(step))
    except OSError as e:  # Not shown to be damaged, but not readable here either.
      return f"its files could not be read: {one_line(e, 200)}"
    if problem:
      return problem
    integrity.warn_if_unverified(self.directory / str(step))
    try:
      params, model_state = self.restore_params(abstract_state, shardings, step)
    except (CheckpointMismatchError, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except  # tensorstore: ValueError, ...
      return f"reading it failed: {one_line(e, 200)}"
    bad = integrity.first_nonfinite(params)
    return f"params/{bad} holds NaN or Inf" if bad else (params, model_state)

  def close(self):
    self.manager.close()
