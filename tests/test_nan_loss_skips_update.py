"""A non-finite loss whose gradients are finite is skipped like a non-finite
gradient (README, What survives what: "NaN/Inf loss or gradient")."""
import jax
import numpy as np

from bigjax import optim, sharding, steps
from configs import mlp


def test_a_nan_loss_with_finite_gradients_is_skipped():
  config = mlp.get_config("variant=deep,runlocal")
  config.model.dropout_rate = 0.0
  assert config.optim.nan_policy == "skip"
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  setup = steps.make_setup(config, mesh, example_shape=(64,))
  train_step = steps.make_train_step(setup)
  rng = np.random.default_rng(0)

  def batch():
    return {"inputs": rng.normal(size=(64, 64)).astype(np.float32),
            "targets": rng.integers(0, 10, 64).astype(np.int32),
            "weights": np.ones(64, np.float32)}

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
