"""bigjax: sharded Transformer and mixture-of-experts training in JAX/Flax NNX."""
