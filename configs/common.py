"""Helpers shared by every config file. Plain data only: no library imports."""
import ml_collections


def parse_arg(arg, lazy=False, **spec):
  """Parses a config arg string such as "variant=small,runlocal".

  Each keyword of `spec` names an allowed key and gives its default; its type
  decides how the string is parsed. A bare word is a boolean flag set to True.
  """
  out = dict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in spec:
      if lazy:
        continue
      raise ValueError(f"Unknown config arg {key!r}; known args: {sorted(spec)}.")
    default = spec[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      words = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}
      if value.lower() not in words:
        raise ValueError(f"Config arg {key}={value!r} is not a boolean; use {key}=true or "
                         f"{key}=false (or the bare word {key}).")
      out[key] = words[value.lower()]
    elif default is not None:
      out[key] = type(default)(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


# The mesh axes, in device order: the last varies fastest, so "tensor" (the most
# communication-heavy) lands on neighbouring devices. A new axis ("sequence",
# "pipeline") is added here, given a size in default_mesh and rules below.
MESH_AXES = ("data", "expert", "fsdp", "tensor")


def default_mesh():
  """Mesh axis sizes named by parallelism type; one -1 takes the remaining devices."""
  return ml_collections.ConfigDict(dict(data=-1, expert=1, fsdp=1, tensor=1))


# The one logical-axis rules table: logical name -> mesh axes. Dimensions resolve
# left to right, each taking the first rule of its name whose mesh axes are still
# free in that array (bigjax/sharding.py). Parameters and activations have names of
# their own, so each is sharded by its own rule.
DEFAULT_RULES = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("classes", None),  # Classifier outputs: few, kept whole.
    ("relpos_buckets", None),  # Relative position biases: a small table.
    ("layers", None),
    # Activations. Rows split over every data-parallel axis (as t5x); the
    # residual stream's features stay whole (sequence parallelism would shard
    # activation_length).
    ("activation_batch", ("data", "expert", "fsdp")),
    # Expert-sharded MoE tensors (activation_exp, activation_batch, ...): "expert"
    # is taken by the experts, so groups keep data and fsdp.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_exp", "expert"),
)


def default_rules():
  """DEFAULT_RULES: a tuple of (logical_name, mesh_axes) pairs, so that
  --config.sharding_rules can be overridden from the command line (ml_collections
  parses a tuple field's value with ast.literal_eval; it refuses list fields)."""
  return DEFAULT_RULES


def moe_config(**overrides):
  """MoE settings under config.model.moe (used when config.model.moe_every > 0)."""
  moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      router="gshard_top2",  # gshard_top2 | switch_top1 | expert_choice | dropless
      top_k=2,  # dropless only
      # Tokens per routing group (S): a divisor of seq_len, or at least seq_len (then
      # each sequence is one group). The dispatch and combine einsums cost in
      # proportion to S (README, Performance: the MoE layer).
      group_size=256,
      capacity_factor=1.25,
      eval_capacity_factor=2.0,
      random_routing=True,
      jitter_noise=0.0,
      # Capacity routers' token moves: auto (gather on CPU, einsum on GPU and TPU) |
      # einsum (GShard's dense dispatch/combine) | gather (a gather, a scatter-add)
      capacity_dispatch="auto",
      # auto (sorted_blocks on CPU and GPU, ragged_dot on TPU) | ragged_dot | sorted_blocks
      # | hopper (Pallas kernels on H100/H200)
      dropless_impl="auto",
      # Expert-parallel dropless exchange (experts split over mesh.expert):
      # auto (ragged on GPU/TPU, padded on CPU) | ragged | padded
      dropless_exchange="auto",
      # sorted_blocks: each expert's rows padded to whole blocks of this many (less
      # padding; chunks of 16, 4 and 1 blocks keep the products long).
      block_size=32,
      aux_loss_weight=0.01,
      z_loss_weight=0.001,
  ))
  moe.update(overrides)
  return moe


def optim_config(**overrides):
  """config.optim: optax optimizer by name, schedule, clipping, NaN policy, freezing."""
  optim = ml_collections.ConfigDict(dict(
      name="adamw",  # sgd | momentum | nesterov | adam | adamw | adafactor | lion
      lr=6e-4,
      warmup_steps=1000,
      schedule="cosine",  # cosine | rsqrt | linear | constant
      end_lr_factor=0.1,
      weight_decay=0.1,
      b1=0.9,  # Also the momentum of momentum / nesterov.
      b2=0.95,
      eps=1e-8,
      clip_norm=1.0,  # 0 disables global-norm clipping.
      clip_value=0.0,  # 0 disables clipping by value.
      # A NaN/Inf gradient: "skip" drops that update (counted as skipped_updates in
      # metrics.jsonl); "halt" stops the run at the next logging step with an error.
      nan_policy="skip",
      # Regex over parameter paths ("decoder/blocks/0/ffn/wi") to freeze.
      freeze="",
  ))
  optim.update(overrides)
  return optim


def init_from_config(**overrides):
  """config.init_from: start a fresh run from another run's parameters (fine-tuning)."""
  init_from = ml_collections.ConfigDict(dict(
      workdir="",  # The source run's --workdir; "" starts from scratch.
      step=-1,  # -1: its latest checkpoint.
      skip="",  # Regex of parameters to re-initialise rather than load.
  ))
  init_from.update(overrides)
  return init_from


def example_config(dataset: str, task: str, **data_overrides):
  """The top of a config for a zoo model trained on (features, label) examples:
  run length, logging, checkpoints, data; the caller adds model and optim."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = task  # classify | binary | regress
  config.total_steps = 1000
  config.batch_size = 64
  config.grad_accum_steps = 1
  config.log_every = 100
  config.eval_every = 500
  config.eval_batches = 1  # Unused: example runs evaluate the whole eval split.
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.async_checkpoint = True
  config.profile_steps = ()  # (start, stop): trace steps start..stop-1 (as metrics rows count).
  config.data = ml_collections.ConfigDict(dict(
      dataset=dataset,  # A prepared tfds dataset; sklearn_toy/* is built locally.
      data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets.
      train_split="train",
      eval_split="test",
      feature_key="features",
      label_key="label",
      standardize=False,  # Per-feature mean/std from the training split.
      feature_columns=(),  # Tabular data: train on these columns only; () = all.
  ))
  config.data.update(data_overrides)
  config.mesh_axes = MESH_AXES
  config.mesh = default_mesh()
  config.sharding_rules = default_rules()
  config.init_from = init_from_config()
  return config


def zoo_model(kind: str, **overrides):
  """config.model for bigjax/models/zoo.py."""
  model = ml_collections.ConfigDict(dict(
      kind=kind,  # mlp | cnn | linear
      num_outputs=10,  # Classes; 1 for binary and regression.
      hidden_dims=(128,),
      conv_features=(),  # cnn: channels of each 3x3 conv (each followed by 2x2 pooling).
      activation="relu",
      batch_norm=False,
      dropout_rate=0.0,
      init="he",  # lecun | xavier | he | zeros
      dtype="float32",
      param_dtype="float32",
  ))
  model.update(overrides)
  return model
