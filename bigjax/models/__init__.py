"""Flax NNX models. They know nothing of training, data, checkpoints or the CLI."""
import dataclasses

import flax

# bigjax places every parameter itself, from the logical names in its metadata
# (bigjax.sharding), inside one jitted initialiser; flax's eager per-variable
# sharding would need a mesh context at every construction, even on one device.
flax.config.update("flax_always_shard_variable", False)


def dataclass_from_config(cls, section: str, values, **converted):
  """`cls(**values)` with every field given and no other: the config files are the
  one source of defaults, so a missing key is an error rather than a silent second
  default, and a misspelt one is an error rather than ignored. `section` names the
  config path ("model", "model.moe") in the message; `converted` replaces values."""
  values = dict(values)
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"config.{section}.{unknown[0]}: is not a setting of {cls.__name__}. "
                     f"Remove it or fix its spelling; the settings are {fields}.")
  missing = [f for f in fields if f not in values]
  if missing:
    raise ValueError(f"config.{section}.{missing[0]}: is missing. Add it (configs/lm.py and "
                     "configs/common.py define every setting).")
  return cls(**{**values, **converted})
