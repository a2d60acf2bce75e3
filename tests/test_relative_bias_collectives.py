"""T5's relative position biases under data parallelism: the gradient that crosses
devices is the [buckets, heads] table's, never a [heads, t, s] bias summed over
the batch (which would be one all-reduce of that size per layer and step)."""
import re

import jax
import numpy as np

from bigjax import config as config_lib, loop, sharding, steps
from configs import t5

LENGTH = 48  # No parameter has this size: a [.., 48, 48] operand is a bias.


def test_data_parallel_train_step_all_reduces_the_table_not_the_bias():
  assert jax.device_count() >= 4, "needs the suite's fake CPU devices (tests/conftest.py)"
  config = t5.get_config()
  config.model.update(num_layers=2, num_decoder_layers=2, emb_dim=64, num_heads=4,
                      mlp_dim=128, max_len=LENGTH, dropout_rate=0.0, dtype="float32",
                      scan_layers=False)
  config.update(batch_size=2 * jax.device_count(), seq_len=LENGTH)
  config_lib.validate(config, num_devices=jax.device_count())
  setup = steps.make_setup(config, sharding.config_mesh(config))
  batch = {k: np.ones((config.batch_size, LENGTH), np.int32)
           for k in ("encoder_inputs", "decoder_inputs", "targets")}
  batch["weights"] = np.ones((config.batch_size, LENGTH), np.float32)
  hlo = steps.make_train_step(setup).lower(
      steps.create_state(setup, 0), loop.global_batch(setup, batch)).compile().as_text()
  # The output shapes of every all-reduce (one, or a tuple once XLA combines them).
  reduced = " ".join(re.findall(r"= (\S+) all-reduce\(", hlo)
                     + re.findall(r"= \(([^)]*)\) all-reduce\(", hlo))
  buckets, heads = config.model.relative_buckets, config.model.num_heads
  assert f"f32[{buckets},{heads}" in reduced  # The tables' gradients are reduced...
  assert f"{LENGTH},{LENGTH}]" not in reduced  # ...and no [.., t, s] bias gradient.
