"""Two runs on one gs:// workdir: the lease object (bigjax/bucket_lease.py) on a
local GCS emulator. A second run is refused naming the holder; a stale lease is
taken over by exactly one of several racers; a lease taken over from under its
holder fails its next renewal in one line."""
import json
import os
import subprocess
import threading
import time
import uuid

import pytest

from bigjax import loop, workdir_lock

FAR = 3600.0  # No renewal by the thread within a test, unless a test asks for one.


@pytest.fixture
def workdir(gcs_bucket):
  return f"{gcs_bucket}/lease-{uuid.uuid4().hex[:8]}/run"


def _lease(workdir, lease_seconds=60.0, renew_seconds=FAR):
  from bigjax import bucket_lease
  return bucket_lease.BucketLease(workdir, lease_seconds=lease_seconds,
                                  renew_seconds=renew_seconds)


def _blob(workdir):
  from google.cloud import storage
  bucket, _, prefix = workdir[len("gs://"):].partition("/")
  return storage.Client().bucket(bucket).get_blob(f"{prefix}/{workdir_lock.LOCK_NAME}")


def _record(workdir):
  blob = _blob(workdir)
  return None if blob is None else json.loads(blob.download_as_bytes())


def test_gs_workdir_gets_a_lease_and_a_second_run_is_refused_naming_the_holder(workdir):
  first = workdir_lock.for_workdir(workdir)
  assert type(first).__name__ == "BucketLease"
  assert first.acquire() is None
  held = _record(workdir)
  assert held["pid"] == os.getpid() and held["expires"] > time.time()
  with pytest.raises(workdir_lock.WorkdirBusyError) as refused:
    workdir_lock.for_workdir(workdir).acquire()
  message = str(refused.value)
  assert "\n" not in message
  assert f"--workdir={workdir} is in use by another run: pid {os.getpid()}" in message
  assert held["started"] in message and "lease until" in message
  assert _record(workdir) == held  # The refused run wrote nothing.
  first.release()


def test_release_then_reacquire(workdir):
  first = _lease(workdir)
  first.acquire()
  first.release()
  assert _blob(workdir) is None
  second = _lease(workdir)
  assert second.acquire() is None  # A clean end leaves nothing to take over.
  assert _record(workdir)["token"] == second._token
  second.release()


def test_expired_lease_is_taken_over(workdir):
  gone = _lease(workdir, lease_seconds=-60.0)  # Stopped renewing a minute ago.
  gone.acquire()
  taker = _lease(workdir)
  note = taker.acquire()
  assert note.startswith(f"Took over {workdir} from a stale run (pid {os.getpid()}")
  assert "its lease expired at" in note
  record = _record(workdir)
  assert record["token"] == taker._token and record["expires"] > time.time() + 30
  taker.release()


def test_lease_of_a_finished_process_on_this_host_is_taken_over(workdir):
  """A holder on this host whose process is gone is stale before its expiry."""
  dead = subprocess.Popen(["true"])
  dead.wait()
  record = {**workdir_lock.this_process(), "pid": dead.pid, "process_start": None,
            "token": "gone", "expires": time.time() + 3600}
  bucket, _, prefix = workdir[len("gs://"):].partition("/")
  from google.cloud import storage
  storage.Client().bucket(bucket).blob(f"{prefix}/{workdir_lock.LOCK_NAME}").upload_from_string(
      json.dumps(record), if_generation_match=0)
  taker = _lease(workdir)
  note = taker.acquire()
  assert f"from a stale run (pid {dead.pid} on" in note and "its process is gone" in note
  assert _record(workdir)["token"] == taker._token
  taker.release()


def test_racers_for_a_stale_lease_exactly_one_wins(workdir):
  _lease(workdir, lease_seconds=-60.0).acquire()
  racers = [_lease(workdir) for _ in range(4)]
  # Every racer has read the stale lease before any of them writes.
  all_read = threading.Barrier(len(racers))
  outcomes = [None] * len(racers)

  def race(i):
    stale = racers[i]._stale
    racers[i]._stale = lambda holder: (stale(holder), all_read.wait())[0]
    try:
      outcomes[i] = racers[i].acquire()
    except workdir_lock.WorkdirBusyError as e:
      outcomes[i] = e

  threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
  assert len(winners) == 1, outcomes
  assert _record(workdir)["token"] == racers[winners[0]]._token
  for i, o in enumerate(outcomes):
    if i != winners[0]:
      assert isinstance(o, workdir_lock.WorkdirBusyError)
      assert "took over the stale lease first" in str(o) and "\n" not in str(o)
  racers[winners[0]].release()


def test_renewal_moves_the_expiry_forward(workdir):
  lease = _lease(workdir, lease_seconds=30.0, renew_seconds=0.05)
  lease.acquire()
  first = _blob(workdir)
  first_expiry = json.loads(first.download_as_bytes())["expires"]
  deadline = time.time() + 10
  while _blob(workdir).generation == first.generation and time.time() < deadline:
    time.sleep(0.05)
  renewed = _record(workdir)
  assert renewed["token"] == lease._token
  assert renewed["expires"] > first_expiry
  lease.check()
  lease.release()
  assert _blob(workdir) is None


def test_a_lease_taken_from_its_holder_fails_its_renewal_in_one_line(workdir):
  from bigjax import bucket_lease
  holder = _lease(workdir, lease_seconds=-60.0, renew_seconds=0.05)
  holder.acquire()
  taker = _lease(workdir)
  # A renewal between the taker's read and its write would make the taker lose the
  # race to take over (the holder's expired lease stays expired: lease_seconds < 0).
  with holder._mutex:
    taker.acquire()
  deadline = time.time() + 10
  while holder.lost is None and time.time() < deadline:
    time.sleep(0.05)
  with pytest.raises(bucket_lease.WorkdirLeaseLostError) as lost:
    holder.check()
  message = str(lost.value)
  assert "\n" not in message
  assert message.startswith(f"--workdir={workdir} was taken over by another run (pid")
  with pytest.raises(bucket_lease.WorkdirLeaseLostError):
    holder.renew()  # Stays lost: no write over the new holder's lease.
  with pytest.raises(bucket_lease.WorkdirLeaseLostError):  # The run stops before a step.
    loop.HoldWorkdir(holder).before_step(None, 7)
  holder.release()  # Leaves the new holder's lease alone.
  assert _record(workdir)["token"] == taker._token
  taker.release()


def test_a_missing_bucket_is_a_one_line_config_error(gcs_bucket):
  from bigjax.config import ConfigError
  workdir = f"{gcs_bucket}-missing/run"
  with pytest.raises(ConfigError, match=r"^--workdir=gs://\S+-missing/run: cannot write there "
                     r"\(NotFound: the bucket does not exist") as e:
    workdir_lock.hold(workdir, print)
  assert "\n" not in str(e.value)


def test_an_unreadable_lease_holds_until_a_lease_after_its_last_write(workdir):
  bucket, _, prefix = workdir[len("gs://"):].partition("/")
  from google.cloud import storage
  storage.Client().bucket(bucket).blob(f"{prefix}/{workdir_lock.LOCK_NAME}").upload_from_string(
      b"\xff not json")
  with pytest.raises(workdir_lock.WorkdirBusyError, match="unreadable run.lock"):
    _lease(workdir).acquire()
  taker = _lease(workdir, lease_seconds=-60.0)  # As if written over a minute ago.
  assert "its lease expired at" in taker.acquire()
  assert _record(workdir)["token"] == taker._token
  taker.release()


def test_a_holder_whose_renewals_fail_stops_before_its_lease_can_be_taken(workdir):
  """Renewals that fail without an answer (network down) tell the holder nothing
  about a takeover: it must stop on its own deadline, not write on into the
  workdir of the run that took the lease over."""
  from bigjax import bucket_lease
  holder = _lease(workdir, lease_seconds=2.0, renew_seconds=0.1)
  holder.acquire()
  holder.check()

  def unreachable(if_generation_match):
    raise ConnectionError("network down")
  holder._write = unreachable  # Every renewal from now on fails.
  time.sleep(0.5)
  holder.check()  # Within the lease less its margin: a failed renewal or two is survived.
  time.sleep(1.2)  # Past 1.6 s (the lease less its margin) without a renewal.
  with pytest.raises(bucket_lease.WorkdirLeaseExpiredError) as expired:
    holder.check()
  message = str(expired.value)
  assert "\n" not in message
  assert message.startswith(f"--workdir={workdir}: this run could not renew its lease for ")
  assert "(last attempt: ConnectionError: network down)" in message
  assert "this run stops to avoid two runs writing it" in message
  with pytest.raises(workdir_lock.WorkdirBusyError):  # The run stops before a step.
    loop.HoldWorkdir(holder).before_step(None, 7)
  time.sleep(0.5)  # Past the lease: another run takes it over.
  taker = _lease(workdir)
  assert "its lease expired at" in taker.acquire()
  with pytest.raises(bucket_lease.WorkdirLeaseExpiredError):
    holder.check()
  holder.release()  # Leaves the new holder's lease alone.
  assert _record(workdir)["token"] == taker._token
  taker.release()


def test_a_holder_that_renews_outlives_its_lease_duration(workdir):
  lease = _lease(workdir, lease_seconds=2.0, renew_seconds=0.1)
  lease.acquire()
  deadline = time.time() + 2.5
  while time.time() < deadline:  # Each successful renewal pushes the deadline on.
    lease.check()
    time.sleep(0.1)
  lease.release()
  assert _blob(workdir) is None
