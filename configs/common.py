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
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is not None:
      out[key] = type(default)(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


def default_mesh():
  """Mesh axes named by parallelism type; one -1 takes the remaining devices."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))


# The one logical-axis rules table: logical name -> mesh axes. First match wins;
# a rule whose mesh axis is already used by another dimension of the same array
# is skipped, so activations ('batch', 'length', 'embed') keep `embed`
# unsharded when `batch` already took `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "expert", "fsdp")),
    # Expert-sharded MoE tensors (exp, batch, ...): groups keep data and fsdp.
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def default_rules():
  return [list(r) if isinstance(r[1], str) or r[1] is None else [r[0], list(r[1])]
          for r in DEFAULT_RULES]


def moe_config(**overrides):
  """MoE settings under config.model.moe (used when config.model.moe_every > 0)."""
  moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      router="gshard_top2",  # gshard_top2 | switch_top1 | expert_choice | dropless
      top_k=2,  # dropless only
      group_size=256,  # tokens per routing group (S); must divide seq_len
      capacity_factor=1.25,
      eval_capacity_factor=2.0,
      random_routing=True,
      jitter_noise=0.0,
      dropless_impl="ragged_dot",  # ragged_dot | sorted_blocks (CPU-friendly)
      block_size=128,
      aux_loss_weight=0.01,
      z_loss_weight=0.001,
  ))
  moe.update(overrides)
  return moe
