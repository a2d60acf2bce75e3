"""Every optimizer named in config.optim trains; schedules and clipping do what they say."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax import optim
from configs import lm


def _optim_config(**kw):
  cfg = lm.get_config("runlocal").optim
  cfg.update(dict(warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.0))
  cfg.update(kw)
  return cfg


# Adafactor scales steps by the parameters' RMS (floored at 1e-3), so from zeros
# it needs a larger nominal learning rate.
@pytest.mark.parametrize("name, lr", [("sgd", 0.1), ("momentum", 0.05), ("nesterov", 0.05),
                                      ("adam", 0.05), ("adamw", 0.05), ("adafactor", 0.5),
                                      ("lion", 0.02)])
def test_each_optimizer_fits_least_squares(name, lr):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = x @ rng.normal(size=(8,)).astype(np.float32) + 0.5
  w_ls, *_ = np.linalg.lstsq(np.c_[x, np.ones(64)], y, rcond=None)  # Closed form.
  params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros((1,))}
  # Decaying to 1% lets sign-based Lion settle instead of oscillating by +-lr.
  tx = optim.make_optimizer(_optim_config(name=name, lr=lr, b2=0.99, schedule="linear",
                                          end_lr_factor=0.01), total_steps=400)
  loss = lambda p: jnp.mean((x @ p["w"][:, 0] + p["b"][0] - y) ** 2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(400):
    params, state = step(params, state)
  got = np.r_[np.asarray(params["w"][:, 0]), np.asarray(params["b"])]
  np.testing.assert_allclose(got, w_ls, atol=0.05, err_msg=name)


def test_warmup_then_cosine_schedule():
  sched = optim.schedule(_optim_config(lr=1.0, warmup_steps=10, schedule="cosine",
                                       end_lr_factor=0.1), total_steps=110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)  # Half-way.
  np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)


def test_linear_and_rsqrt_schedule_values():
  linear = optim.schedule(_optim_config(lr=1.0, warmup_steps=10, schedule="linear",
                                        end_lr_factor=0.2), total_steps=110)
  np.testing.assert_allclose([float(linear(s)) for s in (5, 10, 60, 110)],
                             [0.5, 1.0, 0.6, 0.2], rtol=1e-6)
  # T5's inverse square root: lr / sqrt(step / warmup) past warmup.
  rsqrt = optim.schedule(_optim_config(lr=1.0, warmup_steps=10, schedule="rsqrt"),
                         total_steps=1000)
  np.testing.assert_allclose([float(rsqrt(s)) for s in (5, 10, 40, 90)],
                             [0.5, 1.0, 0.5, 1 / 3], rtol=1e-6)


# Each name against the optax optimizer it stands for, built here from the same
# hyperparameters: the settings reach the right arguments.
OPTAX_REFERENCES = {
    "sgd": lambda c: optax.sgd(c.lr),
    "momentum": lambda c: optax.sgd(c.lr, momentum=c.b1),
    "nesterov": lambda c: optax.sgd(c.lr, momentum=c.b1, nesterov=True),
    "adam": lambda c: optax.adam(c.lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "lion": lambda c: optax.lion(c.lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay),
    "adafactor": lambda c: optax.adafactor(c.lr),
}


@pytest.mark.parametrize("name", sorted(OPTAX_REFERENCES))
def test_each_optimizer_takes_its_optax_steps(name):
  cfg = _optim_config(name=name, lr=0.1, b1=0.8, b2=0.95, eps=1e-6)
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)} for _ in range(3)]
  ours, theirs = optim.make_optimizer(cfg, total_steps=10), OPTAX_REFERENCES[name](cfg)
  p_ours, p_theirs, s_ours, s_theirs = params, params, ours.init(params), theirs.init(params)
  for g in grads:
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_theirs = theirs.update(g, s_theirs, p_theirs)
    p_theirs = optax.apply_updates(p_theirs, u)
  np.testing.assert_allclose(p_ours["w"], p_theirs["w"], rtol=1e-5, atol=1e-7)
  assert not np.allclose(p_ours["w"], params["w"])


def test_clipping_by_value_and_global_norm():
  grads = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([12.0])}  # Global norm 13.
  for kw, want in [(dict(clip_norm=1.0), {"a": [3 / 13, -4 / 13], "b": [12 / 13]}),
                   (dict(clip_value=2.0), {"a": [2.0, -2.0], "b": [2.0]})]:
    tx = optim.make_optimizer(_optim_config(name="sgd", lr=1.0, **kw), total_steps=10)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    for k in grads:  # sgd with lr 1: update = -clipped gradient.
      np.testing.assert_allclose(-np.asarray(updates[k]), want[k], rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_reaches_weight_matrices_only(scan):
  """GPT-2's convention (nanoGPT, and the PyTorch peer's parameter groups): decay
  every kernel and embedding, no bias (attention's per-head [heads, head_dim]
  ones included) and no norm parameter. With zero gradients, AdamW's update is
  then -lr * wd * p for exactly those."""
  from flax import nnx

  from bigjax import steps
  from configs import gpt2
  config = gpt2.get_config("runlocal")
  config.model.update(num_layers=2, scan_layers=scan)
  params = nnx.to_pure_dict(nnx.state(steps.build_model(config, nnx.Rngs(0)), nnx.Param))
  flat = {optim.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  leaf = lambda name: name.rsplit("/", 1)[-1]
  matrices = {"query", "key", "value", "out", "wi", "wo", "embedding"}
  assert {leaf(n) for n in flat} == matrices | {
      "query_bias", "key_bias", "value_bias", "out_bias", "wi_bias", "wo_bias", "scale", "bias"}
  assert any(v.ndim - scan == 2 for n, v in flat.items() if leaf(n) == "query_bias")
  lr, wd = 0.1, 0.5
  tx = optim.make_optimizer(_optim_config(name="adamw", lr=lr, weight_decay=wd), 10)
  params = jax.tree.map(lambda v: v + 1.0, params)  # Biases and all non-zero.
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = optim.path_name(path)
    p = np.asarray(flat[name]) + 1.0
    want = -lr * wd * p if leaf(name) in matrices else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=name)


def test_t5_relative_position_biases_take_no_weight_decay():
  """They are added to the attention logits: biases (HF's parameter groups leave
  out every name with "bias"), although [buckets, heads] has two axes."""
  from flax import nnx

  from bigjax import steps
  from configs import t5
  config = t5.get_config("runlocal")
  config.model.position = "relative"  # T5's own; the variant uses learned positions.
  params = nnx.to_pure_dict(nnx.state(steps.build_model(config, nnx.Rngs(0)), nnx.Param))
  decays = {optim.path_name(p): bool(d) for p, d in
            jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  tables = [n for n in decays if "relative_bias" in n]
  assert tables and not any(decays[n] for n in tables)
  assert all(decays[n] for n in decays if n.endswith(("/query", "/wi", "embedding")))


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_apply_equals_optax_reference_step_finite_or_not(policy):
  # make_apply (one cond around the whole step; clipping by one scalar factor)
  # against the same recipe built from optax's own clip_by_global_norm, adamw and
  # apply_if_finite, step by step through finite and non-finite gradients: the same
  # parameters, moments, schedule count and skip counters.
  cfg = _optim_config(name="adamw", lr=0.1, clip_norm=1.0, weight_decay=0.1,
                      schedule="linear", end_lr_factor=0.1, nan_policy=policy)
  def recipe(learning_rate):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=0.1, mask=optim.decay_mask))
    return optax.apply_if_finite(tx, 2**31 - 1) if policy == "skip" else tx
  reference = optax.inject_hyperparams(recipe)(learning_rate=optim.schedule(cfg, 10))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
  apply = jax.jit(optim.make_apply(cfg, total_steps=10))
  ours, theirs = (params, optim.make_optimizer(cfg, 10).init(params)), \
      (params, reference.init(params))
  for i, scale in enumerate([0.1, 5.0, np.nan, 0.3, np.inf, 2.0]):  # Below / above the clip.
    grads = {"w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32),
             "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    ours = apply(grads, ours[1], ours[0])
    updates, state = reference.update(grads, theirs[1], theirs[0])
    theirs = (optax.apply_updates(theirs[0], updates), state)
    if policy == "halt" and not np.isfinite(scale):
      break  # "halt" applies the update (the loop stops the run): NaNs on both sides.
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)  # Checkpoints resume.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
  if policy == "skip":
    assert int(optim.skipped_updates(ours[1])) == 2
    assert int(ours[1].count) == 6  # The schedule counted the skipped steps.


@pytest.mark.parametrize("policy", ["skip", "halt"])
@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "momentum"])
def test_bfloat16_parameters_keep_their_dtypes_and_take_the_float32_step(name, policy):
  """bfloat16 parameters (model.param_dtype): the step runs (the guard's branches
  agree on dtypes), the state keeps the dtypes it was made with, and the new
  parameters are the float32 step's, rounded."""
  cfg = _optim_config(name=name, lr=0.01, clip_norm=1.0, nan_policy=policy,
                      weight_decay=0.1 if name in optim.DECAYING else 0.0)
  rng = np.random.default_rng(0)
  params32 = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=8), jnp.float32)}
  to16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
  params16 = to16(params32)
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params16)  # The same start.
  apply = jax.jit(optim.make_apply(cfg, total_steps=10))
  state16, state32 = (optim.make_optimizer(cfg, 10).init(p) for p in (params16, params32))
  dtypes = lambda tree: [a.dtype for a in jax.tree.leaves(tree)]
  before = dtypes(state16)
  for _ in range(3):
    grads = to16({"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                  "b": jnp.asarray(rng.normal(size=8), jnp.float32)})
    params16, state16 = apply(grads, state16, params16)
    params32, state32 = apply(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                              state32, params32)
  assert dtypes(state16) == before and dtypes(params16) == [jnp.bfloat16] * 2
  for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(params32)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", optim.DECAYING)
def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate(name):
  # With zero gradients an update is the decay alone: each decaying optimizer
  # shrinks a weight matrix by lr * wd per step, as optax.adamw does, and leaves
  # the masked parameters (vectors, biases) alone. (256, 128) is large enough for
  # Adafactor's factored statistics.
  lr, wd = 1e-3, 0.1
  params = {"w": jnp.full((4, 4), 2.0), "big": jnp.ones((256, 128)), "b": jnp.ones(4),
            "attn": {"query_bias": jnp.ones((2, 4))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(_optim_config(name=name, lr=lr, weight_decay=wd), 10)
  ours, _ = tx.update(zeros, tx.init(params), params)
  reference = optax.adamw(lr, weight_decay=wd, mask=optim.decay_mask)
  theirs, _ = reference.update(zeros, reference.init(params), params)
  after = optax.apply_updates(params, ours)
  for (path, got), want, p, new in zip(jax.tree_util.tree_leaves_with_path(ours),
                                       jax.tree.leaves(theirs), jax.tree.leaves(params),
                                       jax.tree.leaves(after)):
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    decays = p.ndim == 2 and not jax.tree_util.keystr(path).endswith("bias']")
    np.testing.assert_allclose(new, np.asarray(p) * (1 - lr * wd if decays else 1.0),
                               rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_adafactor_decay_adds_to_optax_adafactor_step():
  # With gradients: optax's own Adafactor step, plus -lr * wd * p on the matrices.
  lr, wd = 1e-2, 0.1
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(256, 128)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(128,)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = optim.make_optimizer(_optim_config(name="adafactor", lr=lr, weight_decay=wd), 10)
  ours, _ = tx.update(grads, tx.init(params), params)
  plain = optax.adafactor(lr)
  theirs, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"] - lr * wd * params["w"], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(ours["b"], theirs["b"], rtol=1e-6)


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_a_bfloat16_model_trains_with_its_state_dtypes_kept(policy):
  """The train step scales the summed gradients in their own dtype: a float32
  factor would turn bfloat16 gradients, and with them momentum, into float32."""
  from bigjax import sharding, steps
  config = lm.get_config("runlocal")
  config.model.update(param_dtype="bfloat16", dtype="bfloat16")
  config.optim.update(name="momentum", weight_decay=0.0, nan_policy=policy)
  setup = steps.make_setup(config, sharding.make_mesh({"data": 1}, jax.devices()[:1],
                                                      config.mesh_axes))
  state = steps.create_state(setup, 0)
  dtypes = lambda s: [a.dtype for a in jax.tree.leaves((s.params, s.opt_state))]
  before = dtypes(state)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(3, 259, (8, 32), dtype=np.int32),
           "targets": rng.integers(3, 259, (8, 32), dtype=np.int32),
           "weights": np.ones((8, 32), np.float32)}
  step = steps.make_train_step(setup)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert dtypes(state) == before
  assert losses[-1] < losses[0]
