"""bigjax: sharded Transformer and mixture-of-experts training in JAX/Flax NNX."""
from bigjax import xla_flags

xla_flags.apply()  # Before anything starts JAX's backends.
