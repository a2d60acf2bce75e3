"""Checkpoints under stress: a save killed half-way, and restores onto other topologies."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import checkpoint, sharding, steps
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Saves step 1, starts an async save of step 2 (64 MB of random float32, which
# does not compress) and SIGKILLs itself as soon as orbax's temporary dir exists.
_KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from bigjax import checkpoint, steps

    def state(step):
      key = jax.random.PRNGKey(0)
      params = {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (1024, 1024)) + step
                for i in range(16)}
      return steps.TrainState(step=jnp.int32(step), params=params,
                              opt_state={"count": jnp.int32(step)}, rng=key)

    ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=1, keep=5, async_save=True)
    ckpt.save(1, state(1))
    ckpt.wait()
    big = state(2)
    assert ckpt.save(2, big)  # Returns once the arrays are on the host; writing goes on.
    tmp = os.path.join(str(ckpt.directory), "2" + checkpoint.TMP_MARKER)
    while not os.path.exists(tmp):
      pass
    if os.path.exists(os.path.join(str(ckpt.directory), "2")):
      sys.exit("too late: the save finished before the kill")
    print("killing mid-save", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _abstract(shape_tree, mesh):
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shape_tree)
  return abstract, jax.tree.map(lambda _: rep, shape_tree)


@pytest.mark.slow
def test_kill_during_async_save_is_never_restored(tmp_path, caplog):
  workdir = str(tmp_path)
  r = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, workdir], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == -9 and "killing mid-save" in r.stdout, r.stdout + r.stderr[-3000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2" + checkpoint.TMP_MARKER]

  # Reopening reports and removes the leftover; step 1 is the latest and restores.
  caplog.set_level("WARNING")
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=5)
  assert ckpt.unfinished_removed == ["2" + checkpoint.TMP_MARKER]
  assert "unfinished checkpoint" in caplog.text and "2" + checkpoint.TMP_MARKER in caplog.text
  assert sorted(os.listdir(ckpt_dir)) == ["1"]
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  key = jax.random.PRNGKey(0)
  like = steps.TrainState(step=jnp.int32(0),
                          params={f"w{i}": jnp.zeros((1024, 1024)) for i in range(16)},
                          opt_state={"count": jnp.int32(0)}, rng=key)
  abstract, shardings = _abstract(like, mesh)
  state = ckpt.restore(abstract, shardings)
  assert int(state.step) == 1 and int(state.opt_state["count"]) == 1
  np.testing.assert_array_equal(
      state.params["w3"], jax.random.normal(jax.random.fold_in(key, 3), (1024, 1024)) + 1)
  # Step 2 can be saved again: nothing of the interrupted save is in the way.
  assert ckpt.save(2, state, force=True)
  ckpt.close()
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]


def _batches(n):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    toks = rng.integers(3, 259, (8, 33)).astype(np.int32)
    out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                "weights": np.ones((8, 32), np.float32)})
  return out


def _train(setup, state, batches):
  train_step = steps.make_train_step(setup)
  losses = []
  for b in batches:
    b = {k: jax.device_put(v, setup.batch_sharding()) for k, v in b.items()}
    state, m = train_step(state, b)
    losses.append(float(m["loss"]))  # Blocks each step (simulated devices).
  return state, losses


@pytest.mark.slow
def test_restore_fsdp8_onto_4_2_1_devices_and_data2_tensor2(tmp_path):
  config = lm.get_config("runlocal")
  batches = _batches(5)
  setup8 = steps.make_setup(config, sharding.make_mesh(dict(data=1, fsdp=8)))
  state, _ = _train(setup8, steps.create_state(setup8, seed=0), batches[:2])
  saved = jax.device_get(state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  ckpt.save(2, state)
  ckpt.wait()
  _, want = _train(setup8, state, batches[2:])

  for n, mesh_cfg in ((4, dict(data=1, fsdp=4)), (2, dict(data=1, fsdp=2)), (1, {}),
                      (4, dict(data=2, tensor=2))):
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
    setup = steps.make_setup(config, mesh)
    restored = ckpt.restore(setup.abstract_state, setup.state_shardings, 2)
    for leaf, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.state_shardings)):
      assert leaf.sharding == sh and len(leaf.sharding.device_set) == n
    got_state = jax.device_get(restored)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved),
                            jax.tree.leaves(got_state)):
      np.testing.assert_array_equal(a, b, err_msg=f"{mesh_cfg}: {jax.tree_util.keystr(path)}")
    _, got = _train(setup, restored, batches[2:])
    # Same state and batches; only the reduction order differs between meshes.
    np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=str(mesh_cfg))
  ckpt.close()
