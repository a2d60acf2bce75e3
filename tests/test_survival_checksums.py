"""Checksums beside every checkpoint, finiteness on restore, and the newest good
checkpoint kept through saves of a broken state (Checkpointer, in process)."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import checkpoint, checkpoint_integrity, checkpoint_reader, sharding, steps, train
from bigjax.data import pipeline
from configs import lm
from tests import checkpoint_damage


def _state(step: int, scale: float = 1.0) -> steps.TrainState:
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (64, 64)) * scale + step, "b": jnp.ones(64)}
  return steps.TrainState(step=jnp.int32(step), params=params,
                          opt_state={"count": jnp.int32(step)}, rng=key)


def _abstract():
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = _state(0)
  return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like),
          jax.tree.map(lambda _: rep, like))


def _saved_steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_every_save_carries_checksums_of_all_its_array_files(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.close()
  step_dir = tmp_path / "checkpoints" / "1"
  with open(step_dir / checkpoint_integrity.CHECKSUMS) as f:
    record = json.load(f)
  on_disk = {str(p.relative_to(step_dir)): p.stat().st_size for p in step_dir.rglob("*")
             if p.is_file() and p.name not in ("_CHECKPOINT_METADATA", "commit_success.txt",
                                               checkpoint_integrity.CHECKSUMS)}
  assert {name: size for name, (size, _) in record["files"].items()} == on_disk
  assert record["good"] is True
  assert checkpoint_integrity.damage(step_dir) is None


def test_nonfinite_restored_state_is_damage_and_the_step_before_restores(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2, scale=jnp.nan))
  ckpt.wait()
  reports = []
  state, step = ckpt.restore_latest_intact(*_abstract(), reports.append)
  ckpt.close()
  assert step == 1 and int(state.step) == 1
  np.testing.assert_array_equal(state.params["w"], _state(1).params["w"])
  assert len(reports) == 1 and "step 2 is damaged (params/w holds NaN or Inf)" in reports[0]
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / "2")


def test_saves_of_bad_states_never_rotate_out_the_newest_good_one(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  for step, good in [(1, True), (2, True), (3, False), (4, False), (5, False)]:
    ckpt.save(step, _state(step), good=good)
  ckpt.wait()
  assert _saved_steps(tmp_path) == [2, 4, 5]  # keep-2 plus the newest good one.
  ckpt.save(6, _state(6), good=True)
  ckpt.save(7, _state(7), good=True)
  ckpt.close()
  assert _saved_steps(tmp_path) == [6, 7]  # A newer good one frees step 2.
  reopened = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert reopened.newest_good_step() == 7
  reopened.close()


@pytest.mark.slow
def test_a_run_gone_nan_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
  """From step 11 every batch is NaN (skipped updates, loss NaN): the saves at
  15, 20, 25 hold a state whose loss is not finite, and keep-2 must not delete 10."""
  data_dir = str(tmp_path / "data")
  for split in ("train", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  real = steps.make_train_step

  def make(task):
    step_fn = real(task)

    def poisoned(state, batch):
      if int(state.step) >= 10:
        batch = dict(batch, weights=batch["weights"] * jnp.nan)
      return step_fn(state, batch)
    return poisoned

  monkeypatch.setattr(steps, "make_train_step", make)
  config = lm.get_config("runlocal")
  config.data.data_dir = data_dir
  config.update(dict(total_steps=25, checkpoint_every=5, keep_checkpoints=2, eval_every=100))
  train.run(config, str(tmp_path / "run"))
  assert _saved_steps(tmp_path / "run") == [10, 20, 25]


def _two_steps_step2_without_record(tmp_path):
  """Steps 1 and 2 saved by a Checkpointer; step 2's checksum record deleted and
  a byte of its largest array file flipped, which orbax restores silently."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  step_dir = tmp_path / "checkpoints" / "2"
  os.remove(step_dir / checkpoint_integrity.CHECKSUMS)
  checkpoint_damage.flip_byte(checkpoint_damage.largest_file(step_dir))
  return step_dir


def test_a_step_without_its_checksum_record_is_damage_and_the_step_before_restores(tmp_path):
  step_dir = _two_steps_step2_without_record(tmp_path)
  files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  assert ckpt.newest_good_step() == 1  # An unverifiable step is not the one to keep.
  reports = []
  state, step = ckpt.restore_latest_intact(*_abstract(), reports.append)
  ckpt.close()
  assert step == 1 and int(state.step) == 1
  np.testing.assert_array_equal(state.params["w"], _state(1).params["w"])
  assert len(reports) == 1, reports
  assert reports[0].startswith("Checkpoint step 2 is damaged (its checksum record "
                               "bigjax_checksums.json is missing, so its files cannot be verified")
  aside = tmp_path / "damaged_checkpoints" / "2"  # Set aside whole, not deleted.
  assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == files
  assert _saved_steps(tmp_path) == [1]


def test_steps_that_all_predate_checksum_records_restore_with_a_warning(tmp_path, caplog):
  """A workdir saved before bigjax recorded checksums: nothing shows its steps are
  damaged, so the latest restores (its values still checked finite), with a line
  saying it is unverified; setting it aside would lose the run."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  for step in (1, 2):
    os.remove(tmp_path / "checkpoints" / str(step) / checkpoint_integrity.CHECKSUMS)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  assert ckpt.newest_good_step() == 2
  reports = []
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_intact(*_abstract(), reports.append)
  ckpt.close()
  assert step == 2 and not reports
  np.testing.assert_array_equal(state.params["w"], _state(2).params["w"])
  assert any("no checksum record" in r.getMessage() and r.getMessage().count("/2") >= 1
             for r in caplog.records), caplog.text
  assert _saved_steps(tmp_path) == [1, 2]


def test_the_reader_skips_a_step_without_its_checksum_record(tmp_path):
  """generate's path: the read-only reader notes the step and uses the one before."""
  step_dir = _two_steps_step2_without_record(tmp_path)
  reader = checkpoint_reader.CheckpointReader(str(tmp_path))
  notes = []
  params, _, step = reader.restore_latest_intact_params(*_abstract(), notes.append)
  reader.close()
  assert step == 1
  np.testing.assert_array_equal(params["w"], _state(1).params["w"])
  assert len(notes) == 1 and "step 2" in notes[0] and "bigjax_checksums.json is missing" in notes[0]
  assert step_dir.is_dir()  # The reader never moves anything.


@pytest.mark.parametrize("text", ['{"format": 1, "good": true, "filfs": {}}', "[]",
                                  '{"format": 1, "good": true, "files": {"a": 5}}'])
def test_a_checksum_record_of_another_shape_is_damage_and_the_step_before_restores(
    tmp_path, text):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  # Valid JSON still, as a flipped byte in a key leaves it.
  (tmp_path / "checkpoints" / "2" / checkpoint_integrity.CHECKSUMS).write_text(text)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  assert ckpt.newest_good_step() == 1
  reports = []
  state, step = ckpt.restore_latest_intact(*_abstract(), reports.append)
  ckpt.close()
  assert step == 1 and int(state.step) == 1
  assert len(reports) == 1 and reports[0].startswith(
      "Checkpoint step 2 is damaged (its bigjax_checksums.json is unreadable"), reports
  assert _saved_steps(tmp_path) == [1]
