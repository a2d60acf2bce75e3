"""A run on a gs:// workdir (a local GCS emulator): it trains, is rerun and
resumes from its checkpoint in the bucket, and ends bit-identical to the same
run on local disk; metrics.jsonl holds the same rows; `generate` reads the
bucket's checkpoint; a second run on the workdir is refused by its lease."""
import json
import os
import struct
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest
from etils import epath

from bigjax import generate, train, workdir_lock
from bigjax.config import ConfigError
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _without_credentials(tmp_path) -> dict:
  """An environment with no Google Cloud credentials and no emulator, that never
  reaches the cloud or its metadata server (169.254.169.254): the credentials
  file named first is missing (google.auth stops there), GCE detection is off,
  and the metadata address, were it asked, is a closed local port."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("GOOGLE_", "GCE_", "STORAGE_EMULATOR", "CLOUDSDK_", "FSSPEC_GS",
                              "TENSORSTORE_GCS", "GCSFS_"))}
  env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no-such-key.json"),
             NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9",
             GCE_METADATA_IP="127.0.0.1:9", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
  return env


# bigjax.main, in a Python where the modules named in argv[1] cannot be imported,
# and that resolves no host name but this machine's: should the check regress, the
# run fails here rather than asking storage.googleapis.com.
_MAIN_OFFLINE = """
import runpy, socket, sys
for name in filter(None, sys.argv[1].split(",")):
  sys.modules[name] = None  # `import name` raises ImportError.
resolve = socket.getaddrinfo
def local_only(host, *args, **kwargs):
  if host not in ("localhost", "127.0.0.1", "::1"):
    raise RuntimeError(f"the test allows no network: {host}")
  return resolve(host, *args, **kwargs)
socket.getaddrinfo = local_only
sys.argv = ["bigjax.main", *sys.argv[2:]]
runpy.run_module("bigjax.main", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("missing, want", [
    ("", "cannot write there (no Google Cloud credentials: File {key} was not found.). "
         "Set up credentials: `gcloud auth application-default login`, or "
         "GOOGLE_APPLICATION_CREDENTIALS="),
    ("gcsfs,google.cloud.storage", "cannot write there (gs:// workdirs need the gcs extra: "),
])
def test_bucket_workdir_without_credentials_or_the_gcs_extra_is_one_line(tmp_path, missing,
                                                                          want):
  env = _without_credentials(tmp_path)
  workdir = "gs://no-such-bucket/run"
  r = subprocess.run([sys.executable, "-c", _MAIN_OFFLINE, missing,
                      "--config=configs/lm.py:runlocal", f"--workdir={workdir}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
  want = want.format(key=env["GOOGLE_APPLICATION_CREDENTIALS"])
  assert lines[0].startswith(f"Invalid config: --workdir={workdir}: {want}"), lines[0]
  assert lines[0].endswith("or use a local --workdir.")
  if missing:
    assert "pip install -e '.[gcs]'" in lines[0]


def test_bucket_lease_without_credentials_is_a_config_error(tmp_path, monkeypatch):
  """The lease on its own (not only through config.validate): a ConfigError."""
  from bigjax import bucket_lease
  env = _without_credentials(tmp_path)
  for name in list(os.environ):  # STORAGE_EMULATOR_HOST: set by the gcs_bucket fixture.
    if name not in env:
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ConfigError, match=r"^--workdir=gs://no-such-bucket/run: cannot write "
                     r"there \(no Google Cloud credentials: File .*no-such-key.json was not "
                     r"found.\)\. Set up credentials: `gcloud auth application-default login`"):
    bucket_lease.BucketLease("gs://no-such-bucket/run")


def _small_state(step):
  from bigjax import steps
  key = jax.random.PRNGKey(0)
  return steps.TrainState(step=jax.numpy.int32(step), params={"w": jax.numpy.full(64, step)},
                          opt_state={"count": jax.numpy.int32(step)}, rng=key)


def _bucket_steps(directory):
  return sorted(p.name for p in epath.Path(directory).iterdir())


def test_bucket_save_cut_before_its_commit_file_is_reported_and_removed(gcs_bucket):
  # On a bucket orbax writes into <step>/ and marks it finished with
  # commit_success.txt: a save killed before then is unfinished, not a step.
  from bigjax import checkpoint
  workdir = f"{gcs_bucket}/cut-{uuid.uuid4().hex[:8]}"
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
  ckpt.save(1, _small_state(1))
  ckpt.save(2, _small_state(2))
  ckpt.close()
  directory = f"{workdir}/checkpoints"
  (epath.Path(directory) / "2" / checkpoint.COMMIT_MARKER).unlink()
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
  assert ckpt.unfinished_removed == ["2"]
  assert _bucket_steps(directory) == ["1"] and ckpt.all_steps() == [1]
  ckpt.close()


def test_failed_bucket_save_names_and_removes_its_own_directory(gcs_bucket, monkeypatch):
  from bigjax import checkpoint, checkpoint_errors, checkpoint_integrity
  workdir = f"{gcs_bucket}/fail-{uuid.uuid4().hex[:8]}"
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
  ckpt.save(1, _small_state(1))
  ckpt.wait_and_check()

  def full(step_dir, *, good):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint_integrity, "write", full)
  ckpt.save(2, _small_state(2))
  with pytest.raises(checkpoint_errors.CheckpointSaveError) as failure:
    ckpt.wait_and_check()
  ckpt.close()
  assert f"(writing {workdir}/checkpoints/2;" in str(failure.value), failure.value
  assert "The last good checkpoint is step 1" in str(failure.value)
  assert _bucket_steps(f"{workdir}/checkpoints") == ["1"]
