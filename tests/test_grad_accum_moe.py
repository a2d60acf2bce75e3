"""Gradient accumulation of a MoE model equals one big batch when microbatches
carry different numbers of weighted targets (masked LM, padded rows) and of
padding tokens: the router losses divide by all positions and groups, which
every microbatch holds equally many of, so each microbatch's count by the batch's
weight / accum, not by its own weight or its own real tokens."""
import jax
import numpy as np
import pytest

from bigjax import optim, sharding, steps
from bigjax.models.transformer import PAD_ID
from configs import lm_moe


def _config(accum: int, router: str):
  config = lm_moe.get_config("runlocal")
  config.model.update(dropout_rate=0.0, num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64)
  config.model.moe.update(router=router, random_routing=False, jitter_noise=0.0,
                          group_size=config.seq_len)
  # SGD at lr 1, nothing clipped or decayed: the parameter change is the gradient.
  config.optim.update(name="sgd", lr=1.0, warmup_steps=0, schedule="constant", clip_norm=0.0,
                      clip_value=0.0, weight_decay=0.0)
  config.mesh.update(data=1)
  config.update(batch_size=8, grad_accum_steps=accum)
  return config


def _update(config, batch):
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = steps.create_state(setup, 0)
  before = jax.device_get(state.params)
  state, metrics = steps.make_train_step(setup)(state, batch)
  return jax.device_get(metrics), jax.tree.map(np.subtract, before, jax.device_get(state.params))


@pytest.mark.parametrize("router", ["gshard_top2", "switch_top1"])
def test_unequal_microbatch_weights_give_the_big_batch_gradient(router):
  length = _config(1, router).seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (8, length + 1)).astype(np.int32)
  weights = np.ones((8, length), np.float32)
  weights[[1, 5], 4:] = 0.0  # Microbatch 1 (rows 1, 5: rows i, i+4) weighs 8 of 2L.
  weights[3, 1:] = 0.0  # Microbatch 3 (rows 3, 7) weighs L + 1.
  # Padding tokens, which routing leaves out: row 1 is padding after its first 5
  # tokens, rows 2 and 6 (all of microbatch 2) are padding alone.
  tokens[1, 5:] = PAD_ID
  tokens[[2, 6]] = PAD_ID
  weights[[2, 6]] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  whole, want = _update(_config(1, router), batch)
  split, got = _update(_config(4, router), batch)
  np.testing.assert_allclose(split["loss"], whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(split["router_loss"], whole["router_loss"], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()),
                               err_msg=optim.path_name(path))
