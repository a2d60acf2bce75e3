"""The loop's pieces, driven from outside: train.prepare, then loop.run_loop
with a hook of one's own, against the jitted step called by hand."""
import jax
import numpy as np

from bigjax import loop, steps, train
from configs import mlp


class RecordLosses(loop.Hook):
  def __init__(self):
    self.losses = []

  def after_step(self, lp):
    self.losses.append(float(lp.last_metrics["loss"]))
    if lp.done == 5:
      lp.stop = True  # A hook ends the loop.


def test_run_loop_with_a_custom_hook_equals_the_step_by_hand(tmp_path):
  config = mlp.get_config("variant=binary,runlocal")
  config.data.data_dir = str(tmp_path / "data")
  config.total_steps = 8
  prepared = train.prepare(config, str(tmp_path / "run"))
  prepared.ckpt.close()
  record = RecordLosses()
  lp = loop.run_loop(loop.Loop(prepared.setup, prepared.state, 0), prepared.data.train,
                     [record])
  assert lp.done == 5 and int(lp.state.step) == 5

  # By hand: the same step on batch(0), batch(1), ... from a fresh state. The
  # prefetching thread must have fed the same batches, in order.
  setup, data = prepared.setup, prepared.data.train
  state, train_step = steps.create_state(setup, config.seed), steps.make_train_step(setup)
  want = []
  for step in range(5):
    state, metrics = train_step(state, data.batch(step))
    want.append(float(metrics["loss"]))
  assert record.losses == want
  for a, b in zip(jax.tree.leaves(jax.device_get(lp.state)),
                  jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_array_equal(a, b)
