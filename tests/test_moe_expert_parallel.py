"""Expert-parallel dropless MoE on 8 CPU devices against the one-device layer.

The reference is the same layer traced without a mesh (tokens sorted over the
whole batch, every expert on one device). The sharded layer runs under the
project's rules table with its parameters sharded as in training.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from bigjax import config as config_lib, sharding, steps
from bigjax.errors import ConfigError
from bigjax.models import expert_parallel, layers, moe as moe_lib
from configs import common, lm_moe

EMB, MLP_DIM, E, K = 16, 32, 8, 2
BATCH, LENGTH = 8, 8
MESHES = {"expert8": dict(expert=8), "expert4_data2": dict(expert=4, data=2),
          "expert2_fsdp2_tensor2": dict(expert=2, fsdp=2, tensor=2)}


def _layer(impl="ragged_dot", gated=False, seed=0, **moe_kw):
  cfg = layers.LayerConfig(emb_dim=EMB, num_heads=1, num_kv_heads=1, head_dim=EMB,
                           mlp_dim=MLP_DIM, mlp_activation="silu" if gated else "gelu",
                           gated_mlp=gated)
  moe_cfg = moe_lib.MoEConfig(num_experts=E, router="dropless", top_k=K,
                              dropless_impl=impl, block_size=4, **moe_kw)
  layer = moe_lib.MoEFeedForward(cfg, moe_cfg, rngs=nnx.Rngs(seed))
  # A scaled-up router spreads the tokens over the experts.
  router = np.random.default_rng(seed).normal(size=(EMB, E)) * 2.0
  layer.router[...] = jnp.asarray(router, jnp.float32)
  return layer


def _x(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(BATCH, LENGTH, EMB)),
                     jnp.float32)


def _mesh(name):
  return sharding.make_mesh(MESHES[name])


def _fwd_bwd(layer, mesh=None):
  """Jitted (params, x) -> ((loss, (y, load)), (param grads, x grad)) and its args."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, LENGTH, EMB)),
                          jnp.float32)

  def loss(p, x):
    y, sown = nnx.capture(nnx.merge(graphdef, p, rest), nnx.Intermediate)(x)
    metrics = sown["router_metrics"].get_value()[-1]
    return jnp.sum(y * cotangent) + metrics["aux_loss"], (y, metrics["load"])

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  if mesh is None:
    return jax.jit(grad), params
  rules = common.default_rules()

  def traced(p, x):
    with sharding.use_mesh_rules(mesh, rules):
      return grad(p, x)
  params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
  return jax.jit(traced), params


def _run(layer, x, mesh=None):
  fn, params = _fwd_bwd(layer, mesh)
  if mesh is not None:
    spec = sharding.logical_to_spec(("activation_batch",), common.default_rules(),
                                    mesh.axis_names)
    x = jax.device_put(x, NamedSharding(mesh, spec))
  return jax.device_get(fn(params, x))


def _assert_same(got, want):
  (loss, (y, load)), (grads, gx) = got
  (loss0, (y0, load0)), (grads0, gx0) = want
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, loss0, rtol=1e-5)
  np.testing.assert_array_equal(load, load0)
  np.testing.assert_allclose(gx, gx0, rtol=1e-5, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
    assert float(np.max(np.abs(b))) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_name,impl,gated", [
    ("expert8", "ragged_dot", False), ("expert8", "sorted_blocks", True),
    ("expert4_data2", "ragged_dot", True), ("expert4_data2", "sorted_blocks", False),
    ("expert2_fsdp2_tensor2", "ragged_dot", True)])
def test_outputs_and_gradients_equal_one_device(mesh_name, impl, gated):
  layer = _layer(impl, gated)
  x = _x()
  want = _run(layer, x)
  assert np.sum(want[0][1][1] > 0) == E  # every expert gets tokens
  _assert_same(_run(layer, x, _mesh(mesh_name)), want)


def test_worst_case_routing_drops_nothing():
  """Every token picks experts 0 and 1, both on expert shard 0 of 4: each shard
  sends all of its choices to one shard, which fills its receive buffer."""
  layer = _layer("sorted_blocks")
  router = np.zeros((EMB, E), np.float32)
  router[0, :2] = [30.0, 29.0]
  layer.router[...] = jnp.asarray(router)
  x = np.asarray(_x()).copy()
  x[..., 0] = 1.0 + np.abs(x[..., 0])
  x = jnp.asarray(x)
  want = _run(layer, x)
  np.testing.assert_array_equal(want[0][1][1], [0.5, 0.5] + [0.0] * (E - 2))
  _assert_same(_run(layer, x, _mesh("expert4_data2")), want)


# --------------------------------------------------------------------------
# The compiled program: one all-to-all of the token buffer each way
# --------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"= (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter|"
                         r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _collectives(hlo: str):
  """[(op, [(dtype, shape), ...])] for every collective in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      arrays = [(t, tuple(int(d) for d in s.split(",") if d))
                for t, s in _ARRAY.findall(m.group(1))]
      out.append((m.group(2), arrays))
  return out


@pytest.mark.parametrize("mesh_name", ["expert8", "expert4_data2"])
def test_compiled_program_exchanges_tokens_with_all_to_all(mesh_name):
  mesh = _mesh(mesh_name)
  n = mesh.shape["expert"]
  local_tokens = BATCH * LENGTH // (n * mesh.shape.get("data", 1))
  cap = local_tokens * min(K, E // n)  # rows per slot of the padded exchange
  layer = _layer()
  fn, params = _fwd_bwd(layer, mesh)
  x = jax.ShapeDtypeStruct((BATCH, LENGTH, EMB), jnp.float32, sharding=NamedSharding(
      mesh, sharding.logical_to_spec(("activation_batch",), common.default_rules(),
                                     mesh.axis_names)))

  def token_all_to_alls(hlo):
    ops = _collectives(hlo)
    buffers = [arrays for op, arrays in ops if op == "all-to-all" and
               all(t == "f32" for t, _ in arrays)]
    for arrays in buffers:  # n slots of [cap, M], whether split into a tuple or not
      assert sum(math.prod(s) for _, s in arrays) == n * cap * EMB, arrays
      assert all(s[-2:] == (cap, EMB) for _, s in arrays), arrays
    assert not [a for op, a in ops if op in ("all-gather", "reduce-scatter",
                                             "collective-permute")], ops
    return len(buffers)

  graphdef, p, rest = nnx.split(layer, nnx.Param, ...)

  def forward(p, x):
    with sharding.use_mesh_rules(mesh, common.default_rules()):
      return nnx.merge(graphdef, p, rest)(x)
  assert token_all_to_alls(jax.jit(forward).lower(params, x).compile().as_text()) == 2
  assert token_all_to_alls(fn.lower(params, x).compile().as_text()) == 4  # + transposes


# --------------------------------------------------------------------------
# The ragged exchange, with ragged_all_to_all emulated (it is unimplemented on CPU)
# --------------------------------------------------------------------------


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all as its docstring defines it, from all_gathers: slice i
  of each sender goes to device i // (K / n) and lands at the sender's
  output_offsets[i] there."""
  assert axis_index_groups is None
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  per_device = input_offsets.shape[0] // n
  gather = lambda v: jax.lax.all_gather(v, axis_name)
  operands, offsets_in, sizes, offsets_out = map(
      gather, (operand, input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  result = output
  for source in range(n):
    for j in range(per_device):
      i = me * per_device + j
      size, start_out = sizes[source, i], offsets_out[source, i]
      take = jnp.clip(offsets_in[source, i] + rows - start_out, 0, operand.shape[0] - 1)
      hit = (rows >= start_out) & (rows < start_out + size)
      result = jnp.where(hit[:, None], operands[source][take], result)
  # The receiver's recv_sizes must agree with what was sent to it.
  received = jnp.stack([sizes[s, me * per_device + j] for s in range(n)
                        for j in range(per_device)])
  return jnp.where(jnp.all(received == recv_sizes), result, jnp.nan)


@pytest.mark.parametrize("mesh_name,impl", [("expert8", "sorted_blocks"),
                                            ("expert4_data2", "ragged_dot")])
def test_ragged_exchange_equals_one_device(monkeypatch, mesh_name, impl):
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  monkeypatch.setattr(expert_parallel, "exchange_kind", lambda setting, platform: "ragged")
  layer = _layer(impl, gated=True)
  x = _x()
  got = _run(layer, x, _mesh(mesh_name))
  monkeypatch.undo()
  _assert_same(got, _run(layer, x))


# --------------------------------------------------------------------------
# Settings and errors
# --------------------------------------------------------------------------


def test_exchange_setting():
  assert expert_parallel.exchange_kind("auto", "cpu") == "padded"
  assert expert_parallel.exchange_kind("auto", "gpu") == "ragged"
  assert expert_parallel.exchange_kind("auto", "tpu") == "ragged"
  assert expert_parallel.exchange_kind("padded", "gpu") == "padded"
  with pytest.raises(ValueError, match=r"dropless_exchange='ragged'.*unimplemented on CPU"):
    expert_parallel.exchange_kind("ragged", "cpu")
  with pytest.raises(ValueError, match=r"model.moe.dropless_exchange='fast'; choose one of"):
    _layer(dropless_exchange="fast")
  config = lm_moe.get_config("runlocal")
  config.model.moe.dropless_exchange = "fast"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.moe.dropless_exchange"):
    config_lib.validate(config, num_devices=1)
  # A forced ragged exchange on CPU fails when the layer is traced, naming the field.
  layer = _layer(dropless_exchange="ragged")
  with pytest.raises(ValueError, match="unimplemented on CPU"):
    _run(layer, _x(), _mesh("expert8"))
  # A capacity router never uses the dropless exchange: the setting does not stop it.
  cfg = layers.LayerConfig(emb_dim=EMB, num_heads=1, num_kv_heads=1, head_dim=EMB,
                           mlp_dim=MLP_DIM)
  capacity = moe_lib.MoEFeedForward(cfg, moe_lib.MoEConfig(
      num_experts=E, router="gshard_top2", group_size=LENGTH, dropless_exchange="ragged"),
      rngs=nnx.Rngs(0))
  _assert_same(_run(capacity, _x(), _mesh("expert8")), _run(capacity, _x()))


def test_tokens_must_be_split_over_the_expert_axis():
  layer = _layer()
  mesh = _mesh("expert8")
  rules = ([r for r in common.default_rules() if r[0] != "activation_batch"]
           + [["activation_batch", "data"]])
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def forward(p, x):
    with sharding.use_mesh_rules(mesh, rules):
      return nnx.merge(graphdef, p, rest)(x)
  with pytest.raises(ConfigError, match=r"sharding_rules: the experts are split over "
                                       r"\('expert',\) but the tokens"):
    jax.eval_shape(forward, params, _x())


def test_batch_must_split_over_the_token_shards():
  layer = _layer()
  mesh = _mesh("expert8")
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def forward(p, x):
    with sharding.use_mesh_rules(mesh, common.default_rules()):
      return nnx.merge(graphdef, p, rest)(x)
  with pytest.raises(ConfigError, match=r"a batch of 3 does not split over the 8 shards.*"
                                       r"config.batch_size"):
    jax.eval_shape(forward, params, jnp.zeros((3, LENGTH, EMB)))


def test_without_expert_split_the_one_device_path_runs():
  """A data-parallel mesh (experts not split) keeps the GSPMD path: no all-to-all."""
  layer = _layer()
  mesh = sharding.make_mesh(dict(data=8))
  fn, params = _fwd_bwd(layer, mesh)
  x = _x()
  assert "all-to-all" not in fn.lower(params, x).compile().as_text()
  _assert_same(_run(layer, x, mesh), _run(layer, x))


# --------------------------------------------------------------------------
# A full train step of configs/lm_moe.py with the dropless router
# --------------------------------------------------------------------------


def _train_step(mesh_cfg, num_devices, scan=False, router="dropless"):
  """One train step with SGD at lr 1 (no warmup or clipping): the parameter update
  is minus the gradient. Returns (compiled HLO, update, metrics)."""
  config = lm_moe.get_config("runlocal")
  config.model.update(dropout_rate=0.0, scan_layers=scan)
  config.model.moe.update(router=router, top_k=2, dropless_impl="sorted_blocks",
                          block_size=8)
  config.optim.update(name="sgd", lr=1.0, warmup_steps=0, clip_norm=0.0)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices])
  task = steps.make_setup(config, mesh)
  state = steps.create_state(task, seed=0)
  before = jax.device_get(state.params)
  toks = np.random.default_rng(0).integers(3, 259, (8, 33)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "weights": np.ones((8, 32), np.float32)}
  batch = jax.device_put(batch, {k: task.batch_sharding() for k in batch})
  compiled = steps.make_train_step(task).lower(state, batch).compile()
  new_state, metrics = compiled(state, batch)
  update = jax.tree.map(lambda a, b: a - b, jax.device_get(new_state.params), before)
  return compiled.as_text(), update, jax.device_get(metrics)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_step_on_expert_mesh_matches_one_device(scan):
  """Scanned blocks too (the accelerator configs' default): the experts stay split
  and the tokens move by all-to-all; no expert weights are gathered."""
  hlo, update, metrics = _train_step(dict(expert=8), 8, scan)
  _, update0, metrics0 = _train_step(dict(data=1), 1, scan)
  ops = _collectives(hlo)
  assert any(op == "all-to-all" for op, _ in ops)
  # Scanned with the layers' names on the unit's parameters, the layer fell back to
  # GSPMD: all-gathers of every expert's weights and of every token.
  assert not [a for op, a in ops if op == "all-gather"], ops
  for key in ("loss", "router_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], metrics0[key], rtol=1e-5, err_msg=key)
  assert float(metrics["moe/decoder/blocks/1/dropped"]) == 0.0
  # Sums over tokens run in another order on 8 devices: ULP-level differences,
  # relatively larger where a gradient entry is a near-cancelling sum.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(update),
                          jax.tree.leaves(update0)):
    scale = float(np.max(np.abs(b)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_capacity_layer_keeps_experts_split():
  """GShard's capacity layer in scanned blocks: the tokens move to the experts by
  all-to-all; neither the experts' weights nor the tokens are gathered."""
  hlo, _, _ = _train_step(dict(expert=8), 8, scan=True, router="gshard_top2")
  ops = _collectives(hlo)
  assert any(op == "all-to-all" for op, _ in ops)
  assert not [a for op, a in ops if op == "all-gather"], ops
