"""Config validation, run before anything is compiled.

Each check names the offending field and says how to fix it. `validate`
returns nothing and raises ConfigError (a ValueError) on the first problem.
Problems only the data can reveal (an unknown dataset or split, a split too
short for one batch) are raised by `train.run` as DataError, also before
anything compiles; a checkpoint written by another model raises
checkpoint.CheckpointMismatchError. Both are ConfigErrors.
"""
import math
import numbers
import os
import re

from bigjax import paths, sharding
from bigjax.errors import ConfigError

REQUIRED_TOP_LEVEL = ("seed", "task", "total_steps", "log_every", "eval_every",
                      "checkpoint_every", "batch_size", "model", "optim", "mesh", "data",
                      "init_from", "mesh_axes", "sharding_rules", "async_checkpoint")


class DataError(ConfigError):
  """The configured data cannot feed this run (missing, empty, too short)."""


def _fail(field: str, problem: str, fix: str):
  raise ConfigError(f"config.{field}: {problem} {fix}")


def _get(config, field: str):
  value = config
  for part in field.split("."):
    if part not in value:
      _fail(field, "is missing.", "Start from configs/lm.py, which defines every key.")
    value = value[part]
  return value


def _from_dict(cls, section):
  """The model's dataclass from its config section: a missing or unknown key fails here."""
  try:
    cls.from_dict(section)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(config, *fields):
  for field in fields:
    value = _get(config, field)
    if not _is_int(value) or value <= 0:
      _fail(field, f"must be a positive integer, got {value!r}.", "Set it to a value >= 1.")


def _real(config, *fields):
  """Numbers, before anything compares them (a None or a string from a config
  file would otherwise be a TypeError naming no field)."""
  for field in fields:
    value = _get(config, field)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value)):  # A NaN passes every comparison below.
      _fail(field, f"must be a finite number, got {value!r}.", "Set it to a number.")


def non_negative_ints(config, *fields):
  for field in fields:
    value = _get(config, field)
    if not _is_int(value) or value < 0:
      _fail(field, f"must be an integer >= 0, got {value!r}.", "Use 0 for the default.")


def _name(config, field: str):
  value = _get(config, field)
  if not isinstance(value, str) or not value.strip():
    _fail(field, f"must be a non-empty name, got {value!r}.",
          "Set it as in configs/lm.py (e.g. dataset 'stdlib_py', splits 'train' / "
          "'validation', text_key 'text').")


def _validate_mesh_axes(config) -> tuple:
  axes = _get(config, "mesh_axes")
  if (not isinstance(axes, (list, tuple)) or not axes or len(set(axes)) != len(axes)
      or not all(isinstance(a, str) and a for a in axes)):
    _fail("mesh_axes", f"must list distinct axis names, got {axes!r}.",
          "Write e.g. ('data', 'expert', 'fsdp', 'tensor') (see configs/common.py).")
  for axis in axes:
    if axis not in config.mesh:
      _fail(f"mesh.{axis}", "is missing: every axis in config.mesh_axes needs a size.",
            "Add it (1 if unused, -1 for the remaining devices).")
  return tuple(axes)


def _validate_rules(config, mesh_axes: tuple):
  rules = _get(config, "sharding_rules")
  for i, rule in enumerate(rules):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      _fail(f"sharding_rules[{i}]", f"{rule!r} is not a [logical_name, mesh_axes] pair.",
            "Write e.g. ('embed', 'fsdp') or ('activation_batch', ('data', 'fsdp')).")
    axes = rule[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(axes, (list, tuple)) or any(a not in mesh_axes for a in axes):
      _fail(f"sharding_rules[{i}]", f"{rule[0]!r} maps to {rule[1]!r}, not to mesh axes.",
            f"Use None or names from config.mesh_axes {mesh_axes}.")
  if not any(r[0] == sharding.BATCH[0] for r in rules):
    _fail("sharding_rules", f"has no rule for {sharding.BATCH[0]!r}.",
          f"Add [{sharding.BATCH[0]!r}, ['data', 'expert', 'fsdp']] (see configs/common.py).")


def _validate_moe(config):
  from bigjax.models import expert_parallel, moe, routing

  m, e = config.model, config.model.moe
  if m.moe_every < 0:
    _fail("model.moe_every", f"must be >= 0, got {m.moe_every}.", "Use 0 to disable MoE.")
  # Block i is MoE when (i + 1) % moe_every == 0 (stack.is_moe_block): a stack
  # shallower than moe_every would have none (encdec: both stacks get MoE blocks).
  stacks = {"num_layers": m.num_layers}
  if m.kind == "encdec":
    stacks["num_decoder_layers"] = m.num_decoder_layers or m.num_layers
  for field, depth in stacks.items():
    if m.moe_every > depth:
      _fail("model.moe_every", f"{m.moe_every} is more than model.{field}={depth}, so that "
            "stack would have no MoE block.", f"Use a value from 1 to {depth}, or 0 for a "
            "dense model.")
  _positive(config, "model.moe.num_experts", "model.moe.group_size", "model.moe.top_k",
            "model.moe.block_size")
  _real(config, *(f"model.moe.{field}" for field in (
      "capacity_factor", "eval_capacity_factor", "jitter_noise", "aux_loss_weight",
      "z_loss_weight")))
  if e.router not in routing.ROUTERS:
    _fail("model.moe.router", f"unknown router {e.router!r}.", f"Choose one of {routing.ROUTERS}.")
  if e.dropless_impl not in moe.DROPLESS_IMPLS:
    _fail("model.moe.dropless_impl", f"unknown implementation {e.dropless_impl!r}.",
          f"Choose one of {moe.DROPLESS_IMPLS}.")
  if e.capacity_dispatch not in moe.CAPACITY_DISPATCHES:
    _fail("model.moe.capacity_dispatch", f"unknown dispatch {e.capacity_dispatch!r}.",
          f"Choose one of {moe.CAPACITY_DISPATCHES} ('auto' picks by backend).")
  if e.dropless_exchange not in expert_parallel.EXCHANGES:
    _fail("model.moe.dropless_exchange", f"unknown exchange {e.dropless_exchange!r}.",
          f"Choose one of {expert_parallel.EXCHANGES} ('auto' picks by backend).")
  for field in ("capacity_factor", "eval_capacity_factor"):
    if not e[field] > 0:
      _fail(f"model.moe.{field}", f"must be > 0, got {e[field]}.", "Use e.g. 1.25.")
  k = routing.choices_per_token(e.router, e.top_k)
  if k > e.num_experts and routing.ROUTER_TABLE[e.router].k is None:
    _fail("model.moe.top_k", f"top-{k} routing needs at least {k} experts, got "
          f"num_experts={e.num_experts}.", "Lower top_k or add experts.")
  if k > e.num_experts:  # top_k is dropless's: this router's k is fixed.
    _fail("model.moe.num_experts", f"router {e.router!r} sends each token to {k} distinct "
          f"experts, so it needs at least {k}, got {e.num_experts}.",
          "Add experts, or use router='switch_top1' (one expert per token).")
  if routing.ROUTER_TABLE[e.router].experts_choose and m.kind != "encoder":
    _fail("model.moe.router", f"{e.router} routing looks at future tokens, so it only "
          "suits encoders.", "Use model.kind='encoder' or another router.")
  if (routing.ROUTER_TABLE[e.router].route is not None  # Capacity routers route groups.
      and config.seq_len % e.group_size and e.group_size < config.seq_len):
    _fail("model.moe.group_size", f"{e.group_size} does not divide seq_len={config.seq_len}.",
          "Use a divisor of seq_len (groups never straddle sequences).")
  if not 0 <= e.jitter_noise < 1:
    _fail("model.moe.jitter_noise", f"{e.jitter_noise} is outside [0, 1).", "Use e.g. 0.01.")
  for field in ("aux_loss_weight", "z_loss_weight"):
    if e[field] < 0:
      _fail(f"model.moe.{field}", f"must be >= 0, got {e[field]}.", "Use 0 to disable it.")


def _validate_profile_steps(config):
  window = _get(config, "profile_steps")
  if window is None or (isinstance(window, (tuple, list)) and not window):
    return  # No profile.
  if not (isinstance(window, (tuple, list)) and len(window) == 2 and
          all(_is_int(s) for s in window) and 1 <= window[0] < window[1]):
    _fail("profile_steps", f"must be two step numbers (start, stop) with 1 <= start < stop, "
          f"got {window!r}.", "Use e.g. (10, 13) to trace steps 10, 11 and 12, or () for none.")


def _validate_task(config):
  """The task (bigjax/tasks.py) and a model kind it trains; returns the task."""
  from bigjax import tasks

  task, kind = tasks.get(_get(config, "task")), _get(config, "model.kind")
  all_kinds = sorted({k for t in tasks.REGISTRY.values() for k in t.model_kinds})
  if kind not in all_kinds:
    _fail("model.kind", f"unknown kind {kind!r}.", f"Choose one of {all_kinds}.")
  if kind not in task.model_kinds:
    _fail("model.kind", f"{kind!r} does not train on task={task.name!r}.",
          f"Use model.kind in {task.model_kinds}, or another config.task.")
  return task


def _zoo_kinds() -> tuple:
  from bigjax.models import zoo
  return zoo.KINDS


def _validate_transformer(config):
  from bigjax.models import attention, layers, transformer

  _positive(config, "seq_len")
  non_negative_ints(config, "loss_chunk_len")
  _from_dict(transformer.TransformerConfig, config.model)
  if config.loss_chunk_len and config.seq_len % config.loss_chunk_len:
    _fail("loss_chunk_len", f"{config.loss_chunk_len} does not divide "
          f"seq_len={config.seq_len}.", "Use a divisor of seq_len, or 0 for no chunks.")
  m = config.model
  _positive(config, "model.vocab_size", "model.num_layers", "model.emb_dim",
            "model.num_heads", "model.mlp_dim", "model.max_len")
  non_negative_ints(config, "model.num_kv_heads", "model.head_dim", "model.num_decoder_layers",
                "model.num_classes")
  if m.num_classes and m.kind != "encoder":
    _fail("model.num_classes", f"a classifier head is for encoders; model.kind={m.kind!r}.",
          "Set model.kind='encoder', or model.num_classes=0.")
  if not m.norm_eps > 0:
    _fail("model.norm_eps", f"must be > 0, got {m.norm_eps}.", "Use e.g. 1e-6.")
  if m.init == "normal" and not m.init_scale > 0:
    _fail("model.init_scale", f"must be > 0 for init='normal', got {m.init_scale}.",
          "Use e.g. 0.02.")
  for field, allowed in (("mlp_activation", tuple(layers.ACTIVATIONS)),
                         ("norm", layers.NORMS), ("init", layers.INITS),
                         ("embed_init", layers.EMBED_INITS),
                         ("position", transformer.POSITIONS),
                         ("attention_impl", attention.ATTENTION_IMPLS),
                         ("dtype", layers.DTYPES), ("param_dtype", layers.PARAM_DTYPES)):
    if m[field] not in allowed:
      _fail(f"model.{field}", f"unknown value {m[field]!r}.", f"Choose one of {allowed}.")
  kv_heads = m.num_kv_heads or m.num_heads
  if m.num_kv_heads < 0 or m.num_heads % kv_heads:
    _fail("model.num_kv_heads", f"{m.num_kv_heads} does not divide num_heads={m.num_heads}.",
          "Use a divisor of num_heads (0 means num_heads).")
  if not m.head_dim and m.emb_dim % m.num_heads:
    _fail("model.num_heads", f"{m.num_heads} heads do not divide emb_dim={m.emb_dim}.",
          "Pick num_heads dividing emb_dim, or set model.head_dim explicitly.")
  head_dim = m.head_dim or m.emb_dim // m.num_heads
  if m.position == "rotary" and head_dim % 2:
    _fail("model.head_dim", f"rotary embeddings need an even head_dim, got {head_dim}.",
          "Change emb_dim/num_heads or model.head_dim.")
  if m.position == "relative":
    _positive(config, "model.relative_buckets", "model.relative_max_distance")
    if m.relative_buckets < 4 or m.relative_buckets % 2:
      _fail("model.relative_buckets", f"{m.relative_buckets} is not an even number >= 4.",
            "Use e.g. 32 (T5's).")
    if not m.relative_max_distance > m.relative_buckets // 2:
      _fail("model.relative_max_distance", f"{m.relative_max_distance} is not past the "
            f"{m.relative_buckets // 2} offsets that have buckets of their own.",
            "Use e.g. 128 (T5's).")
    if m.attention_impl == "cudnn":
      _fail("model.attention_impl", "'cudnn' takes no relative position biases.",
            "Use 'auto' or 'xla' with position='relative'.")
  if not 0.0 <= m.dropout_rate < 1.0:
    _fail("model.dropout_rate", f"{m.dropout_rate} is outside [0, 1).", "Use e.g. 0.1.")
  if m.position == "learned" and config.seq_len > m.max_len:
    _fail("seq_len", f"{config.seq_len} is longer than the position table "
          f"model.max_len={m.max_len}.", "Raise model.max_len or lower seq_len.")
  if m.moe_every:
    _validate_moe(config)
  _validate_scan_layers(config)
  _name(config, "data.text_key")


def _validate_scan_layers(config):
  from bigjax.models import stack

  m = config.model
  policy = _get(config, "model.remat_policy")
  if policy not in stack.REMAT_POLICIES:
    _fail("model.remat_policy", f"unknown policy {policy!r}.",
          f"Choose one of {stack.REMAT_POLICIES}.")
  if not isinstance(_get(config, "model.scan_layers"), bool):
    _fail("model.scan_layers", f"must be True or False, got {m.scan_layers!r}.",
          "Set it to True to scan the blocks, False to unroll them.")
  unit = m.moe_every or 1
  for field in ("num_layers", "num_decoder_layers"):
    layers = m[field]
    if m.scan_layers and layers % unit:
      _fail(f"model.{field}", f"{layers} blocks do not split into scanned units of "
            f"model.moe_every={unit} blocks (one MoE block each).",
            "Use a multiple of moe_every, or set model.scan_layers=False.")


def _validate_zoo(config):
  from bigjax.models import layers, zoo

  m = config.model
  _from_dict(zoo.ZooConfig, m)
  _positive(config, "model.num_outputs")
  for field in ("hidden_dims", "conv_features"):
    values = list(m[field])
    if any(not _is_int(v) or v <= 0 for v in values):
      _fail(f"model.{field}", f"must be positive integers, got {values}.",
            "Use widths >= 1, e.g. (128, 64).")
  if m.activation not in layers.ACTIVATIONS:
    _fail("model.activation", f"unknown value {m.activation!r}.",
          f"Choose one of {tuple(layers.ACTIVATIONS)}.")
  if m.init not in zoo.INITS:
    _fail("model.init", f"unknown value {m.init!r}.", f"Choose one of {zoo.INITS}.")
  for field, allowed in (("dtype", layers.DTYPES), ("param_dtype", layers.PARAM_DTYPES)):
    if m[field] not in allowed:
      _fail(f"model.{field}", f"unknown value {m[field]!r}.", f"Choose one of {allowed}.")
  if m.init == "zeros" and (m.kind in ("mlp", "cnn") and m.hidden_dims
                            or m.kind == "cnn" and m.conv_features):
    # Zero kernels and biases: every hidden unit is 0 and gets no gradient.
    _fail("model.init", "'zeros' leaves hidden layers dead: they output 0 and never get a "
          "gradient.", "Use 'lecun', 'xavier' or 'he'.")
  if not 0.0 <= m.dropout_rate < 1.0:
    _fail("model.dropout_rate", f"{m.dropout_rate} is outside [0, 1).", "Use e.g. 0.1.")
  if m.kind == "linear" and (m.hidden_dims or m.batch_norm):
    _fail("model.hidden_dims", "a linear model has no hidden layers or BatchNorm.",
          "Set hidden_dims=() and batch_norm=False, or use model.kind='mlp'.")
  for field in ("feature_key", "label_key"):
    _name(config, f"data.{field}")
  _get(config, "data.feature_columns")
  _get(config, "data.standardize")


def _check_splits(config, sizes: dict, dims):
  """Each (field, size, logical name) of `dims` splits evenly over the mesh axes
  config.sharding_rules map that name to (as steps.check_divisible checks every
  parameter once the model is built; here, before anything is)."""
  rules = [tuple(rule) for rule in config.sharding_rules]
  for field, size, name in dims:
    axes = sharding.logical_to_spec((name,), rules, tuple(sizes))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    split = math.prod(sizes[a] for a in axes)
    if size % split:
      over = " × ".join(f"mesh.{a}={sizes[a]}" for a in axes)
      _fail(field, f"{size} does not split over {over} (config.sharding_rules shard its "
            f"logical axis {name!r} there).", "Change it, the mesh, or that rule.")


def _validate_transformer_mesh(config, sizes):
  m = config.model
  dims = [("model.num_heads", m.num_heads, "heads"),
          ("model.num_kv_heads", m.num_kv_heads or m.num_heads, "heads"),
          ("model.mlp_dim", m.mlp_dim, "mlp"), ("model.vocab_size", m.vocab_size, "vocab"),
          ("model.emb_dim", m.emb_dim, "embed")]
  if m.moe_every:
    dims.append(("model.moe.num_experts", m.moe.num_experts, "exp"))
  _check_splits(config, sizes, dims)


def validate(config, *, num_devices: int, process_count: int = 1, workdir: str | None = None):
  from bigjax import optim  # noqa: keeps this module's import light for configs.

  for key in REQUIRED_TOP_LEVEL:
    if key not in config:
      _fail(key, "is missing.", "Start from configs/lm.py, which defines every key.")
  _positive(config, "total_steps", "log_every", "eval_every", "checkpoint_every",
            "batch_size", "grad_accum_steps", "keep_checkpoints", "eval_batches")
  if not _is_int(config.seed):
    _fail("seed", f"must be an integer, got {config.seed!r}.", "Use e.g. 0.")
  if not isinstance(config.async_checkpoint, bool):
    _fail("async_checkpoint", f"must be True or False, got {config.async_checkpoint!r}.",
          "Set it to a bool.")
  _validate_profile_steps(config)
  task = _validate_task(config)
  transformer = config.model.kind not in _zoo_kinds()
  if transformer:
    _validate_transformer(config)
  else:
    _validate_zoo(config)
  task.validate(config)

  o = config.optim
  if o.name not in optim.OPTIMIZERS:
    _fail("optim.name", f"unknown optimizer {o.name!r}.", f"Choose one of {optim.OPTIMIZERS}.")
  if o.schedule not in optim.SCHEDULES:
    _fail("optim.schedule", f"unknown schedule {o.schedule!r}.",
          f"Choose one of {optim.SCHEDULES}.")
  _real(config, *(f"optim.{k}" for k in ("lr", "clip_norm", "clip_value", "weight_decay",
                                         "b1", "b2", "eps", "end_lr_factor")))
  if not o.lr > 0:
    _fail("optim.lr", f"must be > 0, got {o.lr}.", "Use e.g. 3e-4.")
  non_negative_ints(config, "optim.warmup_steps")
  for field in ("clip_norm", "clip_value", "weight_decay"):
    if o[field] < 0:
      _fail(f"optim.{field}", f"must be >= 0, got {o[field]}.", "Use 0 to disable it.")
  for field in ("b1", "b2"):
    if not 0 <= _get(config, f"optim.{field}") < 1:
      _fail(f"optim.{field}", f"{o[field]} is outside [0, 1).", "Use e.g. 0.9 / 0.95.")
  if not _get(config, "optim.eps") >= 0:
    _fail("optim.eps", f"must be >= 0, got {o.eps}.", "Use e.g. 1e-8.")
  if o.name in optim.USES_EPS and not o.eps > 0:
    # Adam divides by sqrt(v) + eps: a parameter whose gradient is always zero (a
    # position row past seq_len) would get 0/0 = NaN, which no guard sees.
    _fail("optim.eps", f"must be > 0 for optim.name={o.name!r}, got {o.eps}.",
          "Use e.g. 1e-8.")
  if o.weight_decay and o.name not in optim.DECAYING:
    _fail("optim.weight_decay", f"{o.weight_decay} has no effect: optim.name={o.name!r} "
          "has no weight decay.", f"Set it to 0, or use one of {optim.DECAYING}.")
  if not 0 <= _get(config, "optim.end_lr_factor") <= 1:
    _fail("optim.end_lr_factor", f"{o.end_lr_factor} is outside [0, 1].",
          "Use e.g. 0.1 (the final lr is lr × end_lr_factor).")
  policy = _get(config, "optim.nan_policy")
  if policy not in optim.NAN_POLICIES:
    _fail("optim.nan_policy", f"unknown policy {policy!r}.",
          f"Choose one of {optim.NAN_POLICIES}.")
  if _get(config, "optim.freeze"):
    try:
      re.compile(o.freeze)
    except re.error as e:
      _fail("optim.freeze", f"{o.freeze!r} is not a regular expression ({e}).",
            "Write e.g. '^embedder/' to freeze the embeddings.")

  d = config.data
  for field in ("dataset", "train_split", "eval_split"):
    _name(config, f"data.{field}")
  if not isinstance(_get(config, "data.data_dir"), str):
    _fail("data.data_dir", f"must be a path string, got {d.data_dir!r}.",
          "Use '' for $TFDS_DATA_DIR or ~/tensorflow_datasets.")

  # Mesh and batch: every device gets an equal share of every (micro)batch.
  mesh_axes = _validate_mesh_axes(config)
  try:
    sizes = sharding.resolve_mesh_shape(config.mesh, num_devices, mesh_axes)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _validate_rules(config, mesh_axes)
  rules = [tuple(r) for r in config.sharding_rules]
  batch_axes = sharding.batch_mesh_axes(rules)
  dp = sharding.data_parallel_size(sizes, rules)
  if config.batch_size % config.grad_accum_steps:
    _fail("batch_size", f"{config.batch_size} is not divisible by "
          f"grad_accum_steps={config.grad_accum_steps}.", "Make it a multiple.")
  micro = config.batch_size // config.grad_accum_steps
  if micro % dp:
    _fail("batch_size", f"each microbatch of {micro} examples does not split over the "
          f"{dp} data-parallel devices ({'×'.join(batch_axes)}).",
          f"Use a batch_size that is a multiple of {dp * config.grad_accum_steps}.")
  if config.batch_size % process_count:
    _fail("batch_size", f"{config.batch_size} does not split over {process_count} processes.",
          f"Use a multiple of {process_count}.")
  m = config.model
  if transformer:
    _validate_transformer_mesh(config, sizes)
  else:  # The input features' width is known from the data only: steps.make_setup.
    _check_splits(config, sizes, [(f"model.{field}", width, "mlp")
                                  for field in ("hidden_dims", "conv_features")
                                  for width in m[field]])

  _validate_init_from(config, workdir)
  if workdir is not None:
    validate_workdir(workdir)


def _validate_init_from(config, workdir: str | None):
  source = _get(config, "init_from.workdir")
  if not isinstance(source, str):
    _fail("init_from.workdir", f"must be a path string, got {source!r}.",
          "Use '' to start from scratch, or a finished run's --workdir.")
  step = _get(config, "init_from.step")
  if not _is_int(step) or step < -1:
    _fail("init_from.step", f"must be a checkpoint step or -1 (the latest), got {step!r}.",
          "Use -1 or one of the source run's checkpoint steps.")
  try:
    re.compile(_get(config, "init_from.skip"))
  except (re.error, TypeError) as e:
    _fail("init_from.skip", f"{config.init_from.skip!r} is not a regular expression ({e}).",
          "Write e.g. 'embedder/' to re-initialise the embeddings.")
  if source and workdir and not paths.is_remote(source) and (
      os.path.abspath(source) == os.path.abspath(workdir)):
    _fail("init_from.workdir", "is this run's own --workdir.",
          "Rerunning a workdir resumes it by itself; point init_from at another run.")


def validate_workdir(workdir: str):
  """The workdir (or its nearest existing ancestor) must be a writable directory."""
  if not workdir or not str(workdir).strip():
    raise ConfigError("--workdir is empty. Pass the run's directory, e.g. --workdir=/tmp/run.")
  if paths.is_bucket(workdir):
    from bigjax import bucket_lease  # pylint: disable=import-outside-toplevel  # It imports this.
    bucket_lease.check_usable(workdir)
  if paths.is_remote(workdir):  # Remote: whether it can be written is found by the first write.
    return
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f"--workdir={workdir}: {parent} is a file, not a directory. "
                      "Choose another --workdir.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: {parent} is not writable. "
                      "Choose a directory you can write to (or fix its permissions).")
