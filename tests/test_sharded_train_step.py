"""A train step on 8 devices equals the same step on one device; params shard by the rules."""
import jax
import numpy as np
import pytest

from bigjax import sharding, steps
from configs import lm


def _config(**model):
  config = lm.get_config("runlocal")
  config.model.update({"dropout_rate": 0.1, **model})  # Dropout must match across meshes too.
  return config


def _batch(seed=0, batch=8, length=32):
  toks = np.random.default_rng(seed).integers(3, 259, (batch, length + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "weights": np.ones((batch, length), np.float32)}


def _train(config, mesh_cfg, num_devices, batches):
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices])
  setup = steps.make_setup(config, mesh)
  state = steps.create_state(setup, seed=0)
  step = steps.make_train_step(setup)
  losses = []
  for b in batches:
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))  # Block on each step (see conftest).
  return state, losses


MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor4_data2": dict(data=2, tensor=4),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope="module")
def reference():
  config = _config()
  batches = [_batch(0), _batch(1)]
  state, losses = _train(config, dict(data=1), 1, batches)
  return config, batches, jax.device_get(state.params), losses


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_step_matches_one_device(reference, name):
  config, batches, ref_params, ref_losses = reference
  state, losses = _train(config, MESHES[name], 8, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  params = jax.device_get(state.params)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert int(state.step) == 2


def test_parameters_are_sharded_as_the_rules_say():
  config = _config()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  setup = steps.make_setup(config, mesh)
  state = steps.create_state(setup, seed=0)
  p = state.params
  expect = {
      ("embedder", "tokens", "embedding"): ("tensor", "fsdp"),  # (vocab, embed)
      ("decoder", "blocks", 0, "ffn", "wi"): ("fsdp", "tensor"),  # (embed, mlp)
      ("decoder", "blocks", 0, "ffn", "wo"): ("tensor", "fsdp"),  # (mlp, embed)
      ("decoder", "blocks", 1, "attn", "query"): ("fsdp", "tensor", None),  # (embed, heads, kv)
      ("decoder", "blocks", 1, "attn", "out"): ("tensor", None, "fsdp"),  # (heads, kv, embed)
      ("decoder", "final_norm", "scale"): ("fsdp",),
  }
  for path, spec in expect.items():
    x = p
    for key in path:
      x = x[key]
    assert tuple(x.sharding.spec) == spec, path
    # Each device really holds only its slice.
    shard_shape = x.addressable_shards[0].data.shape
    sizes = [mesh.shape[a] if a else 1 for a in spec]
    assert shard_shape == tuple(d // s for d, s in zip(x.shape, sizes)), path
  # Adam moments follow their parameters' sharding.
  leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
  wi_moments = [x for path, x in leaves if "'wi'" in jax.tree_util.keystr(path)]
  assert wi_moments and all(tuple(x.sharding.spec) == ("fsdp", "tensor") for x in wi_moments)


def test_gradient_accumulation_equals_one_big_batch():
  config = _config(dropout_rate=0.0)
  batch = _batch(0, batch=16)
  _, ref = _train(config, dict(data=1), 1, [batch])
  config.grad_accum_steps = 4
  state, got = _train(config, dict(data=2), 2, [batch])
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_logical_rules_first_free_match_wins():
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("length", None)]
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == jax.P("fsdp", "tensor")
  # Activations: batch takes fsdp first, so embed stays unsharded.
  assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == \
      jax.P(("data", "fsdp"), None, None)
  with pytest.raises(ValueError, match="heads"):
    sharding.logical_to_spec(("heads",), rules)


def test_mesh_minus_one_takes_the_rest():
  mesh = sharding.make_mesh(dict(data=-1, tensor=2))
  assert dict(mesh.shape) == dict(data=4, expert=1, fsdp=1, tensor=2)
  with pytest.raises(ValueError, match="multiply to 6"):
    sharding.make_mesh(dict(data=3, tensor=2))
