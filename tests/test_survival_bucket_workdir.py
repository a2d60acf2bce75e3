"""A run on a gs:// workdir (a local GCS emulator): it trains, is rerun and
resumes from its checkpoint in the bucket, and ends bit-identical to the same
run on local disk; metrics.jsonl holds the same rows; `generate` reads the
bucket's checkpoint; a second run on the workdir is refused by its lease."""
import json
import os
import struct
import uuid

import jax
import numpy as np
import pytest
from etils import epath

from bigjax import generate, train, workdir_lock
from configs import lm


def _config(corpus_data_dir, total_steps):
  config = lm.get_config("runlocal")
  config.data.data_dir = corpus_data_dir
  config.total_steps = total_steps
  config.checkpoint_every = 2
  config.log_every = 1
  config.eval_every = 100
  # Constant after warmup: stopping at 2 and extending to 4 sees the same
  # learning rates as a straight 4-step run.
  config.optim.schedule = "constant"
  return config


def _scalars(workdir):
  """{(step, tag): value} of every scalar in the run's TensorBoard event files."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in (epath.Path(workdir) / "tensorboard").iterdir():
    data, at = path.read_bytes(), 0
    while at < len(data):  # TFRecord framing: length, its CRC, data, its CRC.
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        out[event.step, value.tag] = value.simple_value
  return out


def _rows(workdir):
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_bucket_run_resumes_and_equals_a_local_run(gcs_bucket, corpus_data_dir, tmp_path):
  local = str(tmp_path / "local")
  want = train.run(_config(corpus_data_dir, 4), local)

  bucket = f"{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"
  first = train.run(_config(corpus_data_dir, 2), bucket)
  assert int(jax.device_get(first.state.step)) == 2
  steps = sorted(p.name for p in (epath.Path(bucket) / "checkpoints").iterdir())
  assert steps == ["2"]
  got = train.run(_config(corpus_data_dir, 4), bucket)  # Resumes from step 2 in the bucket.

  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(want.state)),
                          jax.tree.leaves(jax.device_get(got.state))):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # Written whole on every logged step, it holds each step once, as locally.
  losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert losses(_rows(bucket)) == losses(_rows(local))
  assert [s for s, _ in losses(_rows(bucket))] == [1, 2, 3, 4]
  assert json.loads((epath.Path(bucket) / "config.json").read_text())["total_steps"] == 4
  # TensorBoard: the same training scalars as locally (throughput is a timing;
  # the bucket run also evaluated at step 2, where it first ended).
  train_scalars = lambda scalars: {k: v for k, v in scalars.items()
                                   if "per_s" not in k[1] and not k[1].startswith("eval")}
  assert train_scalars(_scalars(bucket)) == train_scalars(_scalars(local))
  assert {s for s, tag in _scalars(bucket) if tag == "loss"} == {1, 2, 3, 4}
  assert not (epath.Path(bucket) / workdir_lock.LOCK_NAME).exists()  # Released.

  # generate restores the bucket's latest checkpoint: the trained parameters.
  _, _, model = generate.load_model(bucket)
  from flax import nnx
  served = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  trained = jax.device_get(got.state.params)
  assert jax.tree.structure(served) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  assert (generate.run(bucket, "def ", max_new_tokens=6) ==
          generate.run(local, "def ", max_new_tokens=6))

  # A second run while one holds the workdir: refused, nothing written.
  from bigjax import bucket_lease
  holder = bucket_lease.BucketLease(bucket)
  holder.acquire()
  before = (epath.Path(bucket) / "metrics.jsonl").read_bytes()
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=f"is in use by another run: pid {os.getpid()}"):
      train.run(_config(corpus_data_dir, 6), bucket)
  finally:
    holder.release()
  assert (epath.Path(bucket) / "metrics.jsonl").read_bytes() == before
  assert sorted(p.name for p in (epath.Path(bucket) / "checkpoints").iterdir()) == ["2", "4"]


def test_bucket_metrics_are_rewritten_whole_and_rewound_as_locally(gcs_bucket, tmp_path):
  """GCS has no append: each row rewrites metrics.jsonl, and a resumed run's
  rewind drops the same rows from a bucket's file as from a local one."""
  from bigjax import metrics
  bucket = f"{gcs_bucket}/metrics-{uuid.uuid4().hex[:8]}"
  for workdir in (bucket, str(tmp_path)):
    for start, stop in ((1, 4), (4, 7)):  # A run, then its rerun adding rows.
      writer = metrics.MetricWriter(workdir, enabled=True)
      for step in range(start, stop):
        writer.write(step, {"loss": 1.0 / step})
      writer.close()
    path = epath.Path(workdir) / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 7, "lo')  # Cut short by a kill.
  same_bytes = lambda: ((epath.Path(bucket) / "metrics.jsonl").read_bytes() ==
                        (tmp_path / "metrics.jsonl").read_bytes())
  assert same_bytes()
  rewound = [metrics.rewind_jsonl(w, 4) for w in (bucket, str(tmp_path))]
  assert rewound[0] == rewound[1] == metrics.Rewind(past_rows=2, unreadable=1,
                                                      first_unreadable_line=7)
  assert [r["step"] for r in metrics.read_jsonl(f"{bucket}/metrics.jsonl")] == [1, 2, 3, 4]
  assert same_bytes()
