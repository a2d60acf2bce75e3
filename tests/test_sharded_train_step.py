"""A train step on 8 devices equals the same step on one device; params shard by the rules."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from bigjax import config as config_lib
from bigjax import layer_layout, optim, sharding, steps
from configs import common, linear_regression, lm, mlp


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
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
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


def test_no_device_gathers_a_whole_activation_on_an_fsdp_by_tensor_mesh():
  # The embedding lookup's backward pass once gathered the whole [batch, length,
  # emb] activation onto every device here, to move fsdp from embed to batch.
  import re
  config = _config(dropout_rate=0.0)
  mesh = sharding.make_mesh(MESHES["fsdp4_tensor2"], jax.devices()[:8])
  setup = steps.make_setup(config, mesh)
  batch = _batch()
  hlo = steps.make_train_step(setup).lower(
      steps.create_state(setup, 0), batch).compile().as_text()
  activation = f"f32[8,32,{config.model.emb_dim}]"
  gathered = [shape.split("{")[0] for shape in re.findall(r"= (\S+) all-gather\(", hlo)]
  assert gathered, "no all-gather at all: the mesh is not sharding the weights"
  assert activation not in gathered, gathered


def test_scanned_sharded_step_matches_one_device_unrolled(reference):
  config, batches, ref_params, ref_losses = reference
  config = _config(scan_layers=True)
  state, losses = _train(config, MESHES["data2_fsdp2_tensor2"], 8, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  query = state.params["decoder"]["scanned"][0]["attn"]["query"]  # (layers, embed, heads, kv)
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  flat = lambda tree: {optim.path_name(p): v for p, v in
                       jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}
  want = flat(ref_params)
  got = layer_layout.convert(flat(state.params), {n: v.shape for n, v in want.items()})
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


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
  # SGD at a constant rate, unclipped: one step moves the parameters by -lr × the
  # gradient, so the updated parameters give the gradients exactly.
  config = _config(dropout_rate=0.0)
  config.optim.update(name="sgd", lr=1.0, warmup_steps=0, schedule="constant",
                      clip_norm=0.0, clip_value=0.0, weight_decay=0.0)
  batch = _batch(0, batch=16)
  # Unequal token counts per microbatch (microbatch i holds rows i, i+4, ...): the
  # loss must be normalised by the global count, not averaged over microbatches.
  batch["weights"][0, 5:] = 0.0
  batch["weights"][5] = 0.0

  def one_step(mesh_cfg, num_devices):
    task = steps.make_setup(config, sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices]))
    state = steps.create_state(task, seed=0)
    before = jax.device_get(state.params)
    state, metrics = steps.make_train_step(task)(state, batch)
    after = jax.device_get(state.params)
    grads = jax.tree.map(lambda b, a: (b - a) / config.optim.lr, before, after)
    return jax.device_get(metrics), grads, after

  want_metrics, want_grads, want_params = one_step(dict(data=1), 1)
  config.grad_accum_steps = 4
  got_metrics, got_grads, got_params = one_step(dict(data=2), 2)
  for key in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  assert float(want_metrics["grad_norm"]) > 0
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                               jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_params),
                               jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


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
  mesh = sharding.make_mesh(dict(data=-1, tensor=2), axes=("data", "expert", "fsdp", "tensor"))
  assert dict(mesh.shape) == dict(data=4, expert=1, fsdp=1, tensor=2)
  assert sharding.config_mesh(lm.get_config("runlocal")).shape == dict(data=8, expert=1,
                                                                       fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="multiply to 6"):
    sharding.make_mesh(dict(data=3, tensor=2))
  # More than a CPU host has: the error says how to get that many.
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16 gives 16"):
    sharding.make_mesh(dict(data=16))


def _constraint_specs(fn, *args):
  """The PartitionSpec of every sharding constraint traced in fn(*args), by rank."""
  specs = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "sharding_constraint":
        specs.append((eqn.invars[0].aval.shape, eqn.params["sharding"].spec))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return specs


def test_activations_keep_their_sharding_when_the_batch_rule_changes():
  # Parameters and activations have names of their own: giving batches only the
  # `data` axis frees `fsdp`, and must not shard the residual stream's features
  # over it (they follow activation_embed's rule, not embed's).
  config = lm.get_config("runlocal")
  default = [tuple(r) for r in config.sharding_rules]
  config.sharding_rules = [["activation_batch", "data"]] + [
      r for r in config.sharding_rules if r[0] != "activation_batch"]
  task = steps.make_setup(config, sharding.make_mesh(dict(data=2, fsdp=4), axes=common.MESH_AXES))
  model = steps.build_model(config, nnx.Rngs(0))
  tokens = np.ones((8, config.seq_len), np.int32)
  with sharding.use_mesh_rules(task.mesh, task.rules):
    specs = _constraint_specs(lambda t: model(t), tokens)
  emb = config.model.emb_dim
  residual = [spec for shape, spec in specs if shape == (8, config.seq_len, emb)]
  assert len(residual) >= 2 * config.model.num_layers, specs
  assert all(spec == jax.P("data", None, None) for spec in residual), residual
  # ... while the parameters' `embed` dimension stays on fsdp.
  by_name = {optim.path_name(p): s for p, s in
             jax.tree_util.tree_leaves_with_path(task.state_shardings.params)}
  embed_mlp = [n for n, axes in task.param_axes.items() if axes == ("embed", "mlp")]
  assert embed_mlp and all(by_name[n].spec == jax.P("fsdp", "tensor") for n in embed_mlp)
  # The default batch rule takes every data-parallel axis, features still whole.
  assert sharding.logical_to_spec(
      ("activation_batch", "activation_length", "activation_embed"), default) == \
      jax.P(("data", "expert", "fsdp"), None, None)


@pytest.mark.parametrize("freeze", ["", "^embedder/"])
def test_optimizer_moments_are_sharded_as_the_parameters(freeze):
  config = lm.get_config("runlocal")
  config.optim.update(name="adamw", freeze=freeze)
  mesh = sharding.make_mesh(dict(fsdp=4, tensor=2), axes=common.MESH_AXES)
  task = steps.make_setup(config, mesh)
  params = task.state_shardings.params
  assert any(s.spec != jax.P() for s in jax.tree.leaves(params))  # Something is sharded.
  moments = [m for key in ("mu", "nu") for _, m in
             optax.tree_utils.tree_get_all_with_path(task.state_shardings.opt_state, key)]
  assert len(moments) == 2
  masked = lambda x: isinstance(x, optax.MaskedNode)
  for moment in moments:
    assert jax.tree.structure(moment, is_leaf=masked) == jax.tree.structure(params)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(moment, is_leaf=masked),
                                 jax.tree.leaves(params)):
      frozen = freeze and jax.tree_util.keystr(path).startswith("['embedder']")
      assert masked(got) if frozen else got == want, jax.tree_util.keystr(path)


@pytest.mark.parametrize("make, mesh_cfg, features, message", [
    # 30 input features (the data's, unknown to config.validate) over fsdp=4.
    (lambda: mlp.get_config("variant=binary,runlocal"), dict(data=1, fsdp=4), 30,
     "config.mesh.fsdp: parameter hidden/0/dense/kernel (shape (30, 32)) has 30 along its "
     "logical axis 'embed', which config.sharding_rules split over mesh.fsdp=4; 4 does not "
     "divide 30. Change the mesh (mesh.fsdp must divide 30) or that model dimension."),
    # A linear model's one input over tensor=2.
    (lambda: linear_regression.get_config("runlocal"), dict(data=2, tensor=2), 1,
     "config.mesh.tensor: parameter head/dense/kernel (shape (1, 1)) has 1 along its "
     "logical axis 'mlp', which config.sharding_rules split over mesh.tensor=2; 2 does not "
     "divide 1. Change the mesh (mesh.tensor must divide 1) or that model dimension."),
])
def test_an_indivisible_parameter_is_a_config_error(make, mesh_cfg, features, message):
  # Before the state is created (where jax raises a bare IndivisibleError). Four
  # of conftest's eight CPU devices, as in `--config.mesh.fsdp=4` on four.
  config = make()
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4], axes=config.mesh_axes)
  config_lib.validate(config, num_devices=4)  # Only the data knows `features`.
  with pytest.raises(config_lib.ConfigError) as e:
    steps.make_setup(config, mesh, example_shape=(features,))
  assert str(e.value) == message


def test_an_indivisible_parameter_over_several_mesh_axes():
  config = mlp.get_config("variant=binary,runlocal")
  config.sharding_rules = [["embed", ["fsdp", "tensor"]]] + [
      r for r in config.sharding_rules if r[0] != "embed"]
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4],
                            axes=config.mesh_axes)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.mesh: parameter hidden/0/dense/kernel .* split over "
                           r"mesh\.fsdp=2 × mesh\.tensor=2; 4 does not divide 30\. .*"
                           r"\(mesh\.fsdp × mesh\.tensor must divide 30\)"):
    steps.make_setup(config, mesh, example_shape=(30,))
  # 32 features split: the state is created and sharded as the rule says.
  setup = steps.make_setup(config, mesh, example_shape=(32,))
  kernel = steps.create_state(setup, 0).params["hidden"][0]["dense"]["kernel"]
  assert kernel.sharding.spec == jax.P(("fsdp", "tensor"), None)
  assert kernel.addressable_shards[0].data.shape == (8, 32)


@pytest.mark.parametrize("mesh_axes, sizes, ok", [
    (("data", "tensor"), dict(data=4, tensor=2), True),  # data outermost: blocks of rows
    (("data", "fsdp"), dict(data=2, fsdp=4), True),
    (("tensor", "data"), dict(tensor=2, data=4), False),  # each "process" holds every row
    (("data", "tensor"), dict(data=1, tensor=8), False),
    (("data",), dict(data=8), "reversed"),  # Process 0 holds rows 8..15: permuted, fine.
])
def test_each_process_must_hold_the_rows_the_pipeline_gives_it(mesh_axes, sizes, ok):
  """Two processes of 4 devices each, simulated on 8: the pipeline gives each its
  own 8 rows, which the batch sharding must put on one block of 8 rows of its devices."""
  rules = tuple((name, axes) for name, axes in common.DEFAULT_RULES
                if name == "activation_batch")
  mesh = sharding.make_mesh(sizes, jax.devices()[:8], mesh_axes)
  batch = sharding.named_sharding(mesh, sharding.BATCH, rules)
  devices = list(mesh.devices.flat)  # make_mesh keeps the order it is given
  assert devices == jax.devices()[:8]
  if ok == "reversed":
    devices = devices[4:] + devices[:4]
  for p in range(2):
    check = lambda: sharding.check_rows_per_process(batch, 16, p, 2, devices[4 * p:4 * p + 4])
    if ok:
      check()
    else:
      with pytest.raises(config_lib.ConfigError, match=(
          rf"config.mesh / config.mesh_axes: the devices of process {p} hold rows 0..15 of "
          r"each batch of 16 .* each of the 2 processes reads its own 8 rows")):
        check()


def test_scanned_sharded_adafactor_steps_equal_one_device_unrolled():
  """Adafactor on stacked blocks, sharded (its per-block state too): the unrolled
  model's steps on one device."""
  batches = [_batch(0), _batch(1)]
  configs = [_config(scan_layers=scan, dropout_rate=0.0) for scan in (False, True)]
  for config in configs:
    config.optim.update(name="adafactor", lr=0.05, warmup_steps=0)
  (ref, ref_losses), (state, losses) = (
      _train(configs[0], dict(data=1), 1, batches),
      _train(configs[1], MESHES["data2_fsdp2_tensor2"], 8, batches))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  flat = lambda tree: {optim.path_name(p): v for p, v in
                       jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}
  want = flat(ref.params)
  got = layer_layout.convert(flat(state.params), {n: v.shape for n, v in want.items()})
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
