"""Start a run from another run's checkpoint (`config.init_from`): fine-tuning.

Only the source's parameters are read: its optimizer state, step and RNG stay
behind, so the new run may use another optimizer, schedule and learning rate
(and freeze parameters with optim.freeze). Each parameter of the new model is
  - copied, when the source has one at the same path and shape;
  - copied where the two overlap, when they differ only along `vocab` or
    `classes` dimensions: new vocabulary rows or classes keep their fresh
    initialisation, and a shrunk table keeps the leading rows;
  - left at its fresh initialisation, when the source has no parameter at its
    path (e.g. a new head) or the path matches `init_from.skip` (a regex).
Any other shape difference is an error naming the parameter. The source is
opened read-only: nothing in its workdir is touched, even while it still runs.

BatchNorm running averages (model_state) come along where the source has them
at the same path and shape: they belong to the parameters they normalise for.
Only a run's first start reads the source: a resumed run restores its own
checkpoint, which already holds the fine-tuned parameters.
"""
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec

from bigjax import checkpoint, optim, steps
from bigjax.config import ConfigError

RESIZABLE_AXES = ("vocab", "classes")


def _fail(problem: str, fix: str):
  raise ConfigError(f"config.init_from.workdir: {problem} {fix}")


def _plan(name: str, want, have, axes, skip) -> str:
  """'copy', 'overlap' or 'fresh' for one parameter of the new model."""
  if have is None or (skip and skip.search(name)):
    return "fresh"
  if tuple(have.shape) == tuple(want.shape):
    return "copy"
  differing = [i for i, (a, b) in enumerate(zip(have.shape, want.shape)) if a != b]
  if (len(have.shape) == len(want.shape) and axes
      and all(axes[i] in RESIZABLE_AXES for i in differing)):
    return "overlap"
  raise ConfigError(
      f"config.init_from: parameter {name} has shape {tuple(have.shape)} in the source "
      f"checkpoint and {tuple(want.shape)} in this model (logical axes {axes}); only "
      f"{'/'.join(RESIZABLE_AXES)} dimensions may differ. Match the model config to the "
      "source run's config.json, or re-initialise it with --config.init_from.skip="
      f"'{re.escape(name)}'.")


def _overlap(fresh: jax.Array, loaded: jax.Array, sharding) -> jax.Array:
  """`fresh` with its leading block (the overlap of the two shapes) from `loaded`."""
  def put(f, src):
    block = tuple(slice(0, min(a, b)) for a, b in zip(f.shape, src.shape))
    return f.at[block].set(src[block].astype(f.dtype))
  return jax.jit(put, out_shardings=sharding)(fresh, loaded)


def load(config, setup: steps.TrainSetup, state: steps.TrainState):
  """Returns (state with the source's parameters put in, a one-line summary)."""
  cfg = config.init_from
  skip = re.compile(cfg.skip) if cfg.get("skip") else None
  try:
    reader = checkpoint.CheckpointReader(cfg.workdir)
  except FileNotFoundError as e:
    _fail(str(e), "Point it at a finished training run's --workdir.")
  try:
    step = reader.latest_step() if cfg.get("step", -1) < 0 else cfg.step
    if step is None or step not in reader.all_steps():
      _fail(f"{cfg.workdir} has no finished checkpoint"
            f"{'' if step is None else f' at step {step}'} (it has {reader.all_steps()}).",
            "Train the source run first, or set init_from.step to one of its steps "
            "(-1: the latest).")
    tree = reader.metadata(step)
    if "params" not in tree:
      _fail(f"the checkpoint at step {step} in {cfg.workdir} holds no parameters.",
            "Point it at a bigjax training run.")
    source = {optim.path_name(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
    wanted = {optim.path_name(p): (leaf, s) for (p, leaf), s in zip(
        jax.tree_util.tree_flatten_with_path(setup.abstract_state.params)[0],
        jax.tree.leaves(setup.state_shardings.params))}
    plan = {name: _plan(name, want, source.get(name), setup.param_axes.get(name), skip)
            for name, (want, _) in wanted.items()}
    if not any(p in ("copy", "overlap") for p in plan.values()):
      _fail(f"the checkpoint in {cfg.workdir} shares no parameter with this model (its "
            f"parameters look like {sorted(source)[:3]}, this model's like "
            f"{sorted(wanted)[:3]}).", "Start from a run of the same model family.")
    # Copies land on this run's shardings; resized ones come whole (source
    # shape, replicated) and are cut into place below.
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    targets = {}
    for name, kind in plan.items():
      want, sharding = wanted[name]
      if kind == "copy":
        targets["params/" + name] = jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                         sharding=sharding)
      elif kind == "overlap":
        have = source[name]
        targets["params/" + name] = jax.ShapeDtypeStruct(have.shape, have.dtype,
                                                         sharding=replicated)
    saved_stats = {optim.path_name(p): leaf for p, leaf in
                   jax.tree_util.tree_flatten_with_path(tree.get("model_state", {}))[0]}
    for (path, want), sharding in zip(
        jax.tree_util.tree_flatten_with_path(setup.abstract_state.model_state)[0],
        jax.tree.leaves(setup.state_shardings.model_state)):
      name = optim.path_name(path)
      have = saved_stats.get(name)
      if have is not None and tuple(have.shape) == want.shape and plan.get(
          name.rsplit("/", 1)[0] + "/scale") != "fresh":
        targets["model_state/" + name] = jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                              sharding=sharding)
    loaded = reader.restore(step, targets)
  finally:
    reader.close()

  def merge(path, fresh):
    name = optim.path_name(path)
    if plan[name] == "copy":
      return loaded["params/" + name]
    if plan[name] == "overlap":
      return _overlap(fresh, loaded["params/" + name], wanted[name][1])
    return fresh

  def listed(kind: str, what: str) -> str:
    names = sorted(n for n, p in plan.items() if p == kind)
    return f"{len(names)} {what}" + (f" ({', '.join(names[:6])})" if kind != "copy" and names
                                     else "")

  params = jax.tree_util.tree_map_with_path(merge, state.params)
  model_state = jax.tree_util.tree_map_with_path(
      lambda path, fresh: loaded.get("model_state/" + optim.path_name(path), fresh),
      state.model_state)
  return state.replace(params=params, model_state=model_state), (
      f"Initialised from {cfg.workdir} (step {step}): {listed('copy', 'parameters loaded')}, "
      f"{listed('overlap', 'resized')}, {listed('fresh', 'freshly initialised')}.")
