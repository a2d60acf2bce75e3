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
Any other shape difference is an error naming the parameter, and so is a model
setting that would make the same parameters compute another function (the
activation, the norm, the logits' scale, ...: SAME_FUNCTION, read from the
source's config.json). The source is opened read-only: nothing in its workdir is
touched, even while it still runs.

Parameters are matched block by block (`bigjax.layer_layout`), so a run with
model.scan_layers on can start from a run with it off and the other way round:
stacked parameters are split into blocks or blocks stacked as needed; `skip`
and the summary use per-block names ('decoder/blocks/3/attn/query') either way.

BatchNorm running averages (model_state) come along where the source has them
at the same path and shape: they belong to the parameters they normalise for.
Only a run's first start reads the source: a resumed run restores its own
checkpoint, which already holds the fine-tuned parameters.
"""
import functools
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec

import jax.numpy as jnp

from bigjax import checkpoint_reader, layer_layout, optim, recorded_config, steps
from bigjax import checkpoint_integrity as integrity
from bigjax.checkpoint_errors import one_line
from bigjax.config import ConfigError
from bigjax.models import routing

RESIZABLE_AXES = ("vocab", "classes")
# Transformer settings that change what the same parameters compute (HF's
# from_pretrained takes them from the checkpoint's config): the source's trained
# function is only carried over when they agree. Where both models use them:
# embed_init where both tie their embeddings (it sets the logits' scale: d ** -0.5
# for unit-variance tables), the relative distance where both use relative
# positions, the router where both have MoE layers, top_k where both route dropless.
SAME_FUNCTION = ("kind", "position", "fold_query_scale", "mlp_activation", "gated_mlp", "norm",
                 "norm_eps")
SAME_FUNCTION_WHERE = {"embed_init": "tie_embeddings", "relative_max_distance": "position",
                       "moe.router": "moe_every", "moe.top_k": "moe.router"}
# Settings whose source value must be kept, the other way being harmless: biases
# added to a model trained without them start at zero (the same function), but a
# trained run's biases left out change it.
KEEP_TRAINED = {"use_bias": True}


def _fail(problem: str, fix: str):
  raise ConfigError(f"config.init_from.workdir: {problem} {fix}")


def _plan(name: str, want, have, axes, skip) -> str:
  """'copy', 'overlap', 'fresh' or (a shape it cannot take) 'mismatch' for one
  parameter of the new model."""
  if have is None or (skip and skip.search(name)):
    return "fresh"
  if tuple(have.shape) == tuple(want.shape):
    return "copy"
  differing = [i for i, (a, b) in enumerate(zip(have.shape, want.shape)) if a != b]
  if (len(have.shape) == len(want.shape) and axes
      and all(axes[i] in RESIZABLE_AXES for i in differing)):
    return "overlap"
  return "mismatch"


def _mismatch_error(mismatches: list, skip: str) -> ConfigError:
  """Every parameter whose shape the source cannot fill, in one error (one at a
  time, each suggested skip would only lead to the next); the suggested skip
  keeps the run's own `skip`."""
  shown = "; ".join(f"{name} {have} there, {want} here (logical axes {axes})"
                    for name, have, want, axes in mismatches[:6])
  more = f"; ... {len(mismatches) - 6} more" if len(mismatches) > 6 else ""
  pattern = "^(" + "|".join(re.escape(name) for name, *_ in mismatches) + ")$"  # Just these.
  pattern = f"{skip}|{pattern}" if skip else pattern
  return ConfigError(
      f"config.init_from: {len(mismatches)} parameter(s) have another shape in the source "
      f"checkpoint than in this model, and only {'/'.join(RESIZABLE_AXES)} dimensions may "
      f"differ: {shown}{more}. Match the model config to the source run's config.json, or "
      f"re-initialise them with --config.init_from.skip='{pattern}'.")


def _overlap(fresh: jax.Array, loaded: jax.Array, sharding) -> jax.Array:
  """`fresh` with its leading block (the overlap of the two shapes) from `loaded`."""
  def put(f, src):
    block = tuple(slice(0, min(a, b)) for a, b in zip(f.shape, src.shape))
    return f.at[block].set(src[block].astype(f.dtype))
  return jax.jit(put, out_shardings=sharding)(fresh, loaded)


def _check_same_function(config, step: int):
  """A ConfigError naming every SAME_FUNCTION setting (or KEEP_TRAINED one) that
  the config which trained the source's `step` recorded otherwise, between two
  Transformers (a source without a readable config.json is not checked: its
  shapes still are)."""
  try:
    source = recorded_config.read(config.init_from.workdir, step)["model"]
  except (OSError, ValueError, KeyError):
    return
  here = config.model.to_dict()
  if "norm" not in source or "norm" not in here:  # A zoo model: no such settings.
    return
  value = lambda model, key: functools.reduce(
      lambda d, k: d.get(k) if isinstance(d, dict) else None, key.split("."), model)

  def in_use(by: str) -> bool:
    if by == "position":
      return source["position"] == here["position"] == "relative"
    if by == "moe.router":  # top_k: read by the routers without a k of their own.
      router = value(here, by)
      return (value(source, by) == router and router in routing.ROUTER_TABLE
              and routing.ROUTER_TABLE[router].k is None)
    return bool(source[by]) and bool(here[by])
  keys = SAME_FUNCTION + tuple(k for k, by in SAME_FUNCTION_WHERE.items() if in_use(by))
  differ = [(k, value(source, k), value(here, k)) for k in keys
            if value(source, k) != value(here, k)]
  differ += [(k, kept, value(here, k)) for k, kept in KEEP_TRAINED.items()
             if value(source, k) == kept != value(here, k)]
  absent = [k for k, a, _ in differ if a is None]
  if absent:  # Not even filled in by recorded_config: a setting it does not know.
    raise ConfigError(
        f"config.init_from: the config that trained the source's step {step} records no "
        f"model.{absent[0]}, so whether this model computes the source's function cannot be "
        "checked. Add the value that run used to its config.json (or the "
        f"{recorded_config.KEPT_PREFIX}S.json kept for that step; "
        "recorded_config.SETTINGS_OLDER_RUNS_USED lists the ones known).")
  if differ:
    raise ConfigError(
        "config.init_from: this model would compute another function with the source's "
        "parameters: " + "; ".join(f"model.{k} is {a!r} there, {b!r} here" for k, a, b in differ)
        + ". Set " + ", ".join(f"--config.model.{k}={a}" for k, a, _ in differ)
        + f" (the config that trained step {step}).")


def load(config, setup: steps.TrainSetup, state: steps.TrainState):
  """Returns (state with the source's parameters put in, a one-line summary)."""
  cfg = config.init_from
  skip = re.compile(cfg.skip) if cfg.skip else None
  try:
    reader = checkpoint_reader.CheckpointReader(cfg.workdir)
  except FileNotFoundError as e:
    _fail(str(e), "Point it at a finished training run's --workdir.")
  try:
    step = reader.latest_step() if cfg.step < 0 else cfg.step
    if step is None or step not in reader.all_steps():
      _fail(f"{cfg.workdir} has no finished checkpoint"
            f"{'' if step is None else f' at step {step}'} (it has {reader.all_steps()}).",
            "Train the source run first, or set init_from.step to one of its steps "
            "(-1: the latest).")
    # As a resume would: a damaged source step is never read.
    problem = integrity.damage(reader.directory / str(step))
    if problem:
      _fail(f"its checkpoint at step {step} is damaged ({problem}).",
            f"Set init_from.step to another of its steps ({reader.all_steps()}), or put "
            "back a good copy of that step.")
    integrity.warn_if_unverified(reader.directory / str(step))
    _check_same_function(config, step)
    tree = reader.metadata(step)
    if "params" not in tree:
      _fail(f"the checkpoint at step {step} in {cfg.workdir} holds no parameters.",
            "Point it at a bigjax training run.")
    source = {optim.path_name(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
    wanted = {optim.path_name(p): (leaf, s) for (p, leaf), s in zip(
        jax.tree_util.tree_flatten_with_path(setup.abstract_state.params)[0],
        jax.tree.leaves(setup.state_shardings.params))}
    where = layer_layout.per_block({n: tuple(a.shape) for n, a in source.items()})
    sizes = layer_layout.unit_sizes(wanted)
    rows, plan = {}, {}  # Per parameter: its blocks [(block name, row)], their plans.
    mismatches = []
    for name, (want, _) in wanted.items():
      names = layer_layout.block_names(name, want.shape[0] if want.shape else 0, sizes)
      rows[name] = [(name, None)] if names is None else list(zip(names, range(len(names))))
      axes = setup.param_axes.get(name)
      row_axes = axes if names is None or not axes else axes[1:]
      plan[name] = []
      for block, row in rows[name]:
        src = where.get(block)
        have = None if src is None else jax.ShapeDtypeStruct(
            layer_layout.row_shape(source[src[0]].shape, src[1]), source[src[0]].dtype)
        want_row = jax.ShapeDtypeStruct(layer_layout.row_shape(want.shape, row), want.dtype)
        plan[name].append(_plan(block, want_row, have, row_axes, skip))
        if plan[name][-1] == "mismatch":
          mismatches.append((block, tuple(have.shape), tuple(want_row.shape), row_axes))
    if mismatches:
      raise _mismatch_error(mismatches, cfg.skip)
    by_block = {block: p for name in plan for (block, _), p in zip(rows[name], plan[name])}
    if skip and not any(skip.search(block) for block in by_block):
      raise ConfigError(
          f"config.init_from.skip: {cfg.skip!r} matches no parameter of this model, so "
          f"nothing would be re-initialised. Parameter names look like "
          f"{sorted(by_block)[:3]}; fix the pattern, or set it to '' to load everything.")
    if not any(p in ("copy", "overlap") for p in by_block.values()):
      _fail(f"the checkpoint in {cfg.workdir} shares no parameter with this model (its "
            f"parameters look like {sorted(source)[:3]}, this model's like "
            f"{sorted(wanted)[:3]}).", "Start from a run of the same model family.")
    # A parameter stored under the same name and shape is restored straight onto
    # this run's sharding; every other one the new parameter reads from (split,
    # stacked or resized) comes whole, replicated, and is assembled below.
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    # Same name and shape can still hold other blocks: scanned units of another
    # size (moe_every) stack other layers under "scanned/<j>".
    direct = {name for name, (want, _) in wanted.items()
              if plan[name] == ["copy"] * len(plan[name]) and name in source
              and tuple(source[name].shape) == tuple(want.shape)
              and all(where.get(block) == (name, row) for block, row in rows[name])}
    targets = {}
    for name in direct:
      want, sharding = wanted[name]
      targets["params/" + name] = jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                       sharding=sharding)
    for name in set(wanted) - direct:
      for (block, _), p in zip(rows[name], plan[name]):
        if p != "fresh":
          have = source[where[block][0]]
          targets["params/" + where[block][0]] = jax.ShapeDtypeStruct(
              have.shape, have.dtype, sharding=replicated)
    saved_stats = {optim.path_name(p): leaf for p, leaf in
                   jax.tree_util.tree_flatten_with_path(tree.get("model_state", {}))[0]}
    for (path, want), sharding in zip(
        jax.tree_util.tree_flatten_with_path(setup.abstract_state.model_state)[0],
        jax.tree.leaves(setup.state_shardings.model_state)):
      name = optim.path_name(path)
      have = saved_stats.get(name)
      if have is not None and tuple(have.shape) == want.shape and by_block.get(
          name.rsplit("/", 1)[0] + "/scale") != "fresh":
        targets["model_state/" + name] = jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                              sharding=sharding)
    try:
      loaded = reader.restore(step, targets)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore: ValueError, ...
      _fail(f"reading its checkpoint at step {step} failed ({one_line(e)}).",
            f"Set init_from.step to another of its steps ({reader.all_steps()}).")
  finally:
    reader.close()
  bad = integrity.first_nonfinite(loaded)
  if bad:
    _fail(f"its checkpoint at step {step} holds NaN or Inf ({bad}).",
          "Set init_from.step to a step saved before the run diverged.")

  loaded_params = {name[len("params/"):]: a for name, a in loaded.items()
                   if name.startswith("params/")}

  def merge(path, fresh):
    name = optim.path_name(path)
    if name in direct:
      return loaded_params[name]
    if all(p == "fresh" for p in plan[name]):
      return fresh
    pieces = []
    for (block, row), p in zip(rows[name], plan[name]):
      part = fresh if row is None else fresh[row]
      if p == "copy":
        part = layer_layout.row_of(loaded_params, where[block]).astype(fresh.dtype)
      elif p == "overlap":
        part = _overlap(part, layer_layout.row_of(loaded_params, where[block]), replicated)
      pieces.append(part)
    whole = pieces[0] if rows[name][0][1] is None else jnp.stack(pieces)
    return jax.device_put(whole, wanted[name][1])

  def listed(names: list, what: str, show: bool = True) -> str:
    more = f", ... {len(names) - 6} more" if len(names) > 6 else ""
    return f"{len(names)} {what}" + (f" ({', '.join(sorted(names)[:6])}{more})"
                                     if show and names else "")

  def planned(kind: str) -> list:
    return [n for n, p in by_block.items() if p == kind]

  # Source parameters this model has no place for (fewer blocks, a dropped head).
  unused = sorted(set(where) - {n for n, p in by_block.items() if p != "fresh"})

  params = jax.tree_util.tree_map_with_path(merge, state.params)
  model_state = jax.tree_util.tree_map_with_path(
      lambda path, fresh: loaded.get("model_state/" + optim.path_name(path), fresh),
      state.model_state)
  return state.replace(params=params, model_state=model_state), (
      f"Initialised from {cfg.workdir} (step {step}): "
      f"{listed(planned('copy'), 'parameters loaded', show=False)}, "
      f"{listed(planned('overlap'), 'resized')}, "
      f"{listed(planned('fresh'), 'freshly initialised')}"
      + (f"; {listed(unused, 'of the source left unused')}." if unused else "."))
