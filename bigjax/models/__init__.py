"""Flax NNX models. They know nothing of training, data, checkpoints or the CLI."""
import flax

# bigjax places every parameter itself, from the logical names in its metadata
# (bigjax.sharding), inside one jitted initialiser; flax's eager per-variable
# sharding would need a mesh context at every construction, even on one device.
flax.config.update("flax_always_shard_variable", False)
