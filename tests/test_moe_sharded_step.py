"""Expert parallelism in the real train step of configs/lm_moe.py, on the 8 CPU
devices that conftest forces: on an expert8 or expert4_data2 mesh (GShard's einsum
dispatch too) the loss, router metrics, gradients and a whole train step match the
one-device run; the experts' weights and Adam moments are split over the `expert`
axis; the compiled forward pass moves tokens by one all-to-all each way and never
all-gathers them; and the dropless router matches one device expert-parallel. The
reference is the same config's step on one device. One layer on its own:
tests/test_moe_layer.py."""
import math
import re

import jax
import numpy as np
import pytest

from bigjax import sharding, steps
from configs import lm_moe


MESHES = {"expert8": dict(expert=8, data=1), "expert4_data2": dict(expert=4, data=2)}
# expert4_data2 with GShard's einsums (TPU's default) instead of CPU's gather dispatch.
EINSUM = "expert4_data2 einsum"
SEED = 0


def _config(**moe_overrides):
  config = lm_moe.get_config("runlocal")
  config.model.dropout_rate = 0.0
  config.model.moe.capacity_factor = 0.5  # C = ceil(2 * 0.5 * 32 / 8) = 4: drops.
  config.model.moe.random_routing = True  # Step keys do not depend on the mesh.
  config.model.moe.update(moe_overrides)
  return config


def _batch():
  toks = np.random.default_rng(0).integers(3, 259, (8, 33)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "weights": np.ones((8, 32), np.float32)}


def _setup(mesh_cfg, num_devices, config=None):
  """Task, state and the gradients/sums of the training loss under the step's key."""
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices])
  setup = steps.make_setup(config or _config(), mesh)
  state = steps.create_state(setup, seed=SEED)
  batch = jax.device_put(_batch(), {k: setup.batch_sharding() for k in _batch()})
  weights = steps.router_weights(setup)
  rng = jax.random.fold_in(state.rng, state.step)  # the train step's key for step 0

  @jax.jit
  def grads_and_sums(params, batch):
    def loss(p):
      with sharding.use_mesh_rules(setup.mesh, setup.rules):
        sums = steps.loss_sums(setup.task, setup.model(p), batch, rng, weights)
      return sums["loss_sum"] + sums["router_loss_sum"], sums
    return jax.grad(loss, has_aux=True)(params)

  grads, sums = grads_and_sums(state.params, batch)
  return dict(setup=setup, state=state, batch=batch, grads=jax.device_get(grads),
              sums=jax.device_get(sums), params=jax.device_get(state.params))


@pytest.fixture(scope="module")
def setups():
  """Builds each mesh's setup, state and gradients once, on first use."""
  cache = {}

  def get(name):
    if name == EINSUM and name not in cache:
      cache[name] = _setup(MESHES["expert4_data2"], 8, _config(capacity_dispatch="einsum"))
    if name not in cache:
      cache[name] = _setup(*((dict(data=1), 1) if name == "one" else (MESHES[name], 8)))
    return cache[name]
  return get


def test_router_metrics_show_drops(setups):
  moe = setups("one")["sums"]["moe"]
  assert set(moe) == {f"moe/decoder/blocks/1/{k}" for k in
                      ("aux_loss", "z_loss", "dropped", "router_entropy", "load")}
  assert 0.0 < float(moe["moe/decoder/blocks/1/dropped"]) < 1.0


@pytest.mark.parametrize("name", sorted(MESHES) + [EINSUM])
def test_sharded_loss_metrics_and_gradients_match_one_device(setups, name):
  got, want = setups(name), setups("one")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["params"]),
                          jax.tree.leaves(want["params"])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  for key in ("loss_sum", "router_loss_sum", "weight_sum"):
    np.testing.assert_allclose(got["sums"][key], want["sums"][key], rtol=1e-5, err_msg=key)
  for key, value in want["sums"]["moe"].items():
    np.testing.assert_allclose(got["sums"]["moe"][key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  leaves = jax.tree_util.tree_leaves_with_path(got["grads"])
  assert len(leaves) == len(jax.tree.leaves(want["grads"]))
  for (path, a), b in zip(leaves, jax.tree.leaves(want["grads"])):
    scale = float(np.max(np.abs(b)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{name} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_weights_are_split_over_the_expert_axis(setups, name):
  got = setups(name)
  mesh = got["setup"].mesh
  ffn = got["state"].params["decoder"]["blocks"][1]["ffn"]
  num_experts = _config().model.moe.num_experts
  for key in ("wi", "wo"):
    w = ffn[key]
    assert w.sharding.spec[0] == "expert", (name, key, w.sharding.spec)
    local = w.addressable_shards[0].data.shape
    assert local[0] == num_experts // mesh.shape["expert"], (name, key, local)
    assert local[1:] == w.shape[1:]
  # Adam moments of the experts follow them.
  moments = [x for p, x in jax.tree_util.tree_leaves_with_path(got["state"].opt_state)
             if jax.tree_util.keystr(p).endswith("[1]['ffn']['wi']")]
  assert len(moments) == 2 and all(x.sharding.spec[0] == "expert" for x in moments)


def _collectives_moving_tokens(hlo: str, kind: str, emb_dim: int) -> list[str]:
  """The `kind` ops ("all-to-all", "all-gather") of compiled HLO whose result holds
  token activations (arrays whose last dimension is the embedding width)."""
  found = []
  for line in hlo.splitlines():
    lhs, sep, _ = line.partition(f" {kind}(")
    if sep and any(int(shape.split(",")[-1]) == emb_dim
                   for shape in re.findall(r"f32\[([\d,]+)\]", lhs.partition("=")[2])):
      found.append(line.strip())
  return found


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_parallel_forward_moves_tokens_by_one_all_to_all_each_way(setups, name):
  # The README's claim: the dispatched tensor goes to the experts by one all-to-all
  # and comes back by one; the tokens are never gathered whole on every device.
  setup = setups(name)["setup"]
  state = setups(name)["state"]
  hlo = steps.make_eval_step(setup).lower(state.params, state.model_state,
                                           setups(name)["batch"]).compile().as_text()
  emb = setup.config.model.emb_dim
  assert not _collectives_moving_tokens(hlo, "all-gather", emb)
  assert len(_collectives_moving_tokens(hlo, "all-to-all", emb)) == 2


def test_train_step_on_expert_mesh_matches_one_device(setups):
  got, want = setups("expert8"), setups("one")
  setup = got["setup"]
  state = steps.create_state(setup, seed=SEED)  # a fresh copy: the step donates it
  new_state, metrics = steps.make_train_step(setup)(state, got["batch"])
  metrics = jax.device_get(metrics)
  assert int(new_state.step) == 1
  sums = want["sums"]
  denom = sums["weight_sum"]
  np.testing.assert_allclose(metrics["loss"], sums["loss_sum"] / denom, rtol=1e-5)
  np.testing.assert_allclose(metrics["router_loss"], sums["router_loss_sum"] / denom,
                             rtol=1e-5)
  grad_norm = math.sqrt(sum(float(np.sum(np.square(g / denom)))
                            for g in jax.tree.leaves(want["grads"])))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
  for key, value in sums["moe"].items():
    if key.endswith("/load"):
      for e, v in enumerate(value):
        np.testing.assert_allclose(metrics[f"{key}/expert_{e}"], v, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("impl", ["sorted_blocks", "ragged_dot"])
def test_dropless_on_expert_mesh_matches_one_device(impl):
  """The dropless path runs expert-parallel (tokens exchanged by all-to-all inside a
  shard_map, see tests/test_moe_expert_parallel.py). Same loss, metrics and
  gradients as one device."""
  config = _config(router="dropless", top_k=2, dropless_impl=impl, block_size=8)
  got = _setup(dict(expert=4, data=2), 8, config)
  want = _setup(dict(data=1), 1, config)
  np.testing.assert_allclose(got["sums"]["loss_sum"], want["sums"]["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(got["sums"]["router_loss_sum"], want["sums"]["router_loss_sum"],
                             rtol=1e-5)
  assert float(got["sums"]["moe"]["moe/decoder/blocks/1/dropped"]) == 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["grads"]),
                          jax.tree.leaves(want["grads"])):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{impl} {jax.tree_util.keystr(path)}")
