"""NaN/Inf losses and gradients: skipped and counted, or the run halts (optim.nan_policy).

A real NaN is injected through the real jitted train step: at one step the batch's
weights are NaN, so the loss and every gradient are NaN.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import config as config_lib, loop, optim, sharding, steps, train
from configs import lm, mlp


def _config(corpus_data_dir, policy, **top):
  config = lm.get_config("runlocal")
  config.data.data_dir = corpus_data_dir
  config.optim.nan_policy = policy
  config.update(top)
  return config


def _inject_nan_at(monkeypatch, at_step: int, record: dict):
  """Wraps steps.make_train_step so that update number `at_step` (0-based) sees a
  batch whose weights are NaN; records the state just before and after it."""
  real = steps.make_train_step

  def make(task):
    step_fn = real(task)

    def wrapped(state, batch):
      if int(state.step) != at_step:
        return step_fn(state, batch)
      batch = dict(batch, weights=batch["weights"] * jnp.nan)
      record["before"] = jax.device_get(state)
      state, metrics = step_fn(state, batch)
      record["after"], record["metrics"] = jax.device_get((state, metrics))
      return state, metrics
    return wrapped

  monkeypatch.setattr(steps, "make_train_step", make)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_apply_if_finite_wrapper_unit():
  cfg = lm.get_config("runlocal").optim
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  for policy, wraps in (("skip", True), ("halt", False)):
    cfg.nan_policy = policy
    tx = optim.make_optimizer(cfg, total_steps=10)
    opt_state = tx.init(params)
    assert (optim.skipped_updates(opt_state) is not None) == wraps
  cfg.nan_policy = "skip"
  tx = optim.make_optimizer(cfg, total_steps=10)
  s0 = tx.init(params)
  bad = {"w": jnp.full((3, 2), jnp.inf), "b": jnp.ones(2)}
  updates, s1 = tx.update(bad, s0, params)
  assert all((u == 0).all() for u in jax.tree.leaves(updates))
  _assert_trees_equal(optim.guard_state(s0).inner_state, optim.guard_state(s1).inner_state)
  assert int(optim.skipped_updates(s1)) == 1
  cfg.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy"):
    optim.make_optimizer(cfg, total_steps=10)


@pytest.mark.slow
def test_skip_policy_drops_the_update_and_counts_it(tmp_path, corpus_data_dir, monkeypatch):
  record = {}
  _inject_nan_at(monkeypatch, 2, record)  # The third update.
  config = _config(corpus_data_dir, "skip", total_steps=6, log_every=2, eval_every=6,
                   checkpoint_every=6)
  result = train.run(config, str(tmp_path))
  before, after = record["before"], record["after"]
  assert np.isnan(record["metrics"]["loss"]) and np.isnan(record["metrics"]["grad_norm"])
  _assert_trees_equal(before.params, after.params)  # Parameters untouched...
  _assert_trees_equal(optim.guard_state(before.opt_state).inner_state,  # ...moments,
                      optim.guard_state(after.opt_state).inner_state)
  assert int(after.step) == int(before.step) + 1  # while the data/RNG step moves on.
  assert int(optim.skipped_updates(before.opt_state)) == 0
  assert int(optim.skipped_updates(after.opt_state)) == 1
  # The run went on and finished with finite parameters.
  assert int(result.state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
  rows = {r["step"]: r for r in _rows(str(tmp_path)) if "loss" in r}
  assert [rows[s]["skipped_updates"] for s in (2, 4, 6)] == [0, 1, 1]
  assert np.isfinite(rows[4]["loss"])  # The window's mean over its finite steps.


@pytest.mark.slow
def test_a_skip_in_the_first_window_is_said_like_any_other(tmp_path, corpus_data_dir,
                                                          monkeypatch, capsys):
  _inject_nan_at(monkeypatch, 1, {})  # The second update: the first row's window.
  config = _config(corpus_data_dir, "skip", total_steps=4, log_every=2, eval_every=4,
                   checkpoint_every=4)
  train.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "step 2: skipped 1 update(s) with non-finite gradients (1 in total)." in out, out
  assert "step 4: skipped" not in out  # Said once, not again at the next row.
  rows = [r for r in _rows(str(tmp_path)) if "loss" in r]
  assert [r["skipped_updates"] for r in rows] == [1, 1]
  assert all(type(r["skipped_updates"]) is int for r in rows)  # A count: 1, not 1.0.


@pytest.mark.slow
def test_halt_policy_stops_before_saving_a_nonfinite_state(tmp_path, corpus_data_dir, monkeypatch):
  record = {}
  _inject_nan_at(monkeypatch, 4, record)  # Update number 5.
  config = _config(corpus_data_dir, "halt", total_steps=8, log_every=4, eval_every=8,
                   checkpoint_every=2)
  with pytest.raises(loop.NonFiniteError) as e:
    train.run(config, str(tmp_path))
  msg = str(e.value)
  assert "Non-finite training step 5" in msg and "nan_policy='halt'" in msg
  assert "latest checkpoint, step 4" in msg and "nan_policy='skip'" in msg
  assert np.isnan(record["metrics"]["loss"])
  # Found at step 6 (a checkpoint step) before saving it: step 4 stays the latest.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert [r["step"] for r in _rows(str(tmp_path)) if "loss" in r] == [4]


def test_validate_rejects_unknown_policy():
  config = lm.get_config("runlocal")
  config.optim.nan_policy = "ignore"
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.nan_policy.*skip"):
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_skipped_steps_do_not_delay_the_schedule(name):
  cfg = lm.get_config("runlocal").optim
  cfg.update(name=name, nan_policy="skip", schedule="linear", lr=1.0, warmup_steps=4,
             end_lr_factor=0.1, weight_decay=0.0, clip_norm=0.0)
  total, skipped = 10, {1, 2, 5}
  schedule = optim.schedule(cfg, total)
  tx = optim.make_optimizer(cfg, total_steps=total)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for n in range(9):
    g = jnp.nan if n in skipped else 0.5
    updates, state = tx.update({"w": jnp.full(3, g)}, state, params)
    lr = float(schedule(n))  # The schedule itself at train step n, skips or not.
    if n not in skipped:
      # What was applied: -lr * g for SGD; for Adam a constant gradient's
      # bias-corrected moments give -lr * g / (|g| + eps).
      want = -lr * 0.5 if name == "sgd" else -lr * 0.5 / (0.5 + cfg.eps)
      np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5, err_msg=str(n))
  assert int(optim.skipped_updates(state)) == len(skipped)
  # What the loop logs as learning_rate: the last update's, schedule(8).
  assert float(optim.applied_learning_rate(state)) == pytest.approx(float(schedule(8)))


def _mlp_step_and_batches(**optim_kw):
  """The digits MLP's (with BatchNorm) jitted train step, its setup, and a maker
  of random batches of 64 examples."""
  config = mlp.get_config("variant=deep,runlocal")
  config.model.dropout_rate = 0.0
  config.optim.update(optim_kw)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  setup = steps.make_setup(config, mesh, example_shape=(64,))
  rng = np.random.default_rng(0)

  def batch():
    return {"inputs": rng.normal(size=(64, 64)).astype(np.float32),
            "targets": rng.integers(0, 10, 64).astype(np.int32),
            "weights": np.ones(64, np.float32)}
  return steps.make_train_step(setup), setup, batch


def test_a_skipped_step_keeps_the_batchnorm_statistics():
  train_step, setup, batch = _mlp_step_and_batches(nan_policy="skip")
  state, _ = train_step(steps.create_state(setup, 0), batch())  # Statistics move off init.
  before = jax.device_get(state)
  bad = batch()
  bad["inputs"][3, 5] = np.nan  # NaN batch statistics, NaN gradients: skipped.
  state, metrics = train_step(state, bad)
  after = jax.device_get(state)
  assert np.isnan(metrics["loss"]) and int(optim.skipped_updates(after.opt_state)) == 1
  _assert_trees_equal(before.model_state, after.model_state)
  _assert_trees_equal(before.params, after.params)
  state, _ = train_step(state, batch())  # A finite step updates them again.
  moved = jax.device_get(state.model_state)["hidden"][0]["norm"]["mean"]
  assert np.isfinite(moved).all() and not np.array_equal(
      moved, before.model_state["hidden"][0]["norm"]["mean"])


def test_a_nan_loss_with_finite_gradients_is_skipped():
  """A non-finite loss whose gradients are finite is skipped like a non-finite
  gradient (README, What survives what: "NaN/Inf loss or gradient")."""
  assert mlp.get_config("variant=deep,runlocal").optim.nan_policy == "skip"
  train_step, setup, batch = _mlp_step_and_batches()
  state, _ = train_step(steps.create_state(setup, 0), batch())  # Moments, statistics set.
  before = jax.device_get(state)
  bad = batch()
  bad["targets"][3] = 12  # Past the 10 classes: a NaN cross-entropy, finite gradients.
  # What the guard saw before it looked at the loss: the gradients alone are finite.
  stats = jax.tree.map(jax.numpy.asarray, before.model_state)  # BatchNorm writes to them.
  loss = lambda p: steps.loss_sums(setup.task, setup.model(p, stats), bad,
                                   jax.random.PRNGKey(0))["loss_sum"]
  assert np.isnan(float(loss(before.params)))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(loss)(before.params)))

  state, metrics = train_step(state, bad)
  after = jax.device_get(state)
  assert np.isnan(metrics["loss"])
  assert int(optim.skipped_updates(after.opt_state)) == 1
  # Parameters, Adam's moments and count, and BatchNorm's statistics as they were.
  inner = lambda s: optim.guard_state(s).inner_state
  for name, a, b in (("params", before.params, after.params),
                     ("model_state", before.model_state, after.model_state),
                     ("moments", inner(before.opt_state), inner(after.opt_state))):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y, err_msg=f"{name}{jax.tree_util.keystr(path)}")

  state, metrics = train_step(state, batch())  # A finite step updates them again.
  assert np.isfinite(metrics["loss"]) and int(optim.skipped_updates(state.opt_state)) == 1
  moved = jax.device_get(state.params)["head"]["dense"]["kernel"]
  assert np.isfinite(moved).all()
  assert not np.array_equal(moved, before.params["head"]["dense"]["kernel"])
