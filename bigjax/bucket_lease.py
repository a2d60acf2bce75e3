"""One run per gs:// workdir: a lease object, WORKDIR/run.lock.

A bucket has no locks, but every write can carry a generation precondition
(`ifGenerationMatch`), which GCS checks atomically. So:

- acquire: create the object only if none exists (generation 0). It names the
  holder (pid, host, start, command) and when its lease expires.
- renew: rewrite it only if its generation is still the one we wrote, pushing
  the expiry forward (compare-and-swap). If the generation moved, someone else
  took the workdir: the renewal fails in one line and the run stops at its next
  step (`check`).
- expiry: renewals can also fail without an answer (network down), and then
  nothing tells the holder that another run took over. So the holder keeps its
  own deadline, a monotonic clock's reading at its last successful write plus
  the lease less a margin, and `check` stops the run once it has passed: the
  holder stops writing before anyone may take the lease over.
- a second run finds the object and is refused with a line naming the holder,
  unless the lease is stale: expired (its holder stopped renewing), or held by a
  process on this host that is gone. A stale lease is taken over by a write
  conditioned on the generation that was read as stale, so of two runs racing
  for it exactly one wins; the other is refused, naming the winner.
- release: delete the object, conditioned on our generation; not once past
  the holder's deadline (the lease may be another run's by then, and it
  expires on its own).

A background thread renews, rather than the loop at each step boundary: a
lease stands for "the holder's process is alive", and a step boundary can be
minutes away (the first compile, an evaluation, a slow save), which would force
an expiry long enough to block a rerun after a crash for as long.

Expiry times are wall-clock times of the writing host; hosts are assumed to
agree to well within LEASE_SECONDS.
"""
import datetime
import json
import os
import threading
import time
import uuid

from bigjax import paths
from bigjax.errors import ConfigError
from bigjax.workdir_lock import (LOCK_NAME, WorkdirBusyError, WorkdirLock, alive, describe,
                                 this_process)

LEASE_SECONDS = 300.0  # How long a holder that stopped renewing blocks the workdir.
RENEW_SECONDS = 60.0  # Several renewals per lease: a failed request or two is survived.
# The holder stops this share of a lease (60 s of 300) before it expires: room
# for hosts' clocks that disagree, and for writes already under way when the
# run stops (a background checkpoint save).
MARGIN_FRACTION = 0.2


def _clock() -> float:
  """Seconds on a clock that wall-clock changes do not move and that runs on while
  the machine is suspended (Linux's CLOCK_BOOTTIME; CLOCK_MONOTONIC stops then, and
  a resumed VM would think its lease still fresh)."""
  return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class WorkdirLeaseLostError(WorkdirBusyError):
  """Another run took the workdir's lease from this one."""


class WorkdirLeaseExpiredError(WorkdirLeaseLostError):
  """This run could not renew its lease in time: another run may take it over."""


# What to do when no Google Cloud credentials are found.
_GCS_CREDENTIALS_FIX = (
    "Set up credentials: `gcloud auth application-default login`, or "
    "GOOGLE_APPLICATION_CREDENTIALS=/path/to/service-account-key.json (or "
    "STORAGE_EMULATOR_HOST=http://HOST:PORT for a local GCS emulator); or use a local "
    "--workdir.")


def _gcs_extra_error(workdir: str, error: ImportError) -> ConfigError:
  return ConfigError(
      f"--workdir={workdir}: cannot write there (gs:// workdirs need the gcs extra: "
      f"{' '.join(str(error).split())}). Install it: pip install -e '.[gcs]' (gcsfs and "
      "google-cloud-storage), or use a local --workdir.")


def _gcs_credentials_error(workdir: str, error: Exception) -> ConfigError:
  reason = " ".join(str(error).split())
  reason = reason if len(reason) <= 200 else reason[:197] + "..."
  return ConfigError(f"--workdir={workdir}: cannot write there (no Google Cloud credentials: "
                     f"{reason}). {_GCS_CREDENTIALS_FIX}")


def check_usable(workdir: str):
  """A gs:// workdir needs the gcs extra and credentials (unless STORAGE_EMULATOR_HOST
  points the clients at an emulator): checked here, before anything touches the
  bucket, rather than found as an ImportError or google.auth's traceback. Whether
  the bucket exists and may be written is found by the workdir lease's first write."""
  _storage(workdir)  # The gcs extra.
  if os.environ.get("STORAGE_EMULATOR_HOST"):  # The clients need no credentials there.
    return
  import logging

  import google.auth
  from google.auth import exceptions
  logger = logging.getLogger("google.auth._default")  # Its warning would repeat ours.
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    google.auth.default()  # What storage.Client() and gcsfs look up.
  except exceptions.DefaultCredentialsError as e:
    raise _gcs_credentials_error(workdir, e) from None
  finally:
    logger.setLevel(level)


def _storage(workdir: str):
  """(google.cloud.storage, google.api_core.exceptions); a ConfigError naming the
  workdir and the extra to install if the gcs extra is missing."""
  try:
    import gcsfs  # noqa: F401  # pylint: disable=unused-import  # epath's gs:// files.
    from google.api_core import exceptions
    from google.cloud import storage
  except ImportError as e:
    raise _gcs_extra_error(workdir, e) from None
  return storage, exceptions


def _client(storage, workdir: str):
  """A storage client; a ConfigError naming the workdir and what to set up if no
  credentials are found (rather than google.auth's traceback)."""
  from google.auth import exceptions as auth_errors
  try:
    return storage.Client()
  except auth_errors.DefaultCredentialsError as e:
    raise _gcs_credentials_error(workdir, e) from None


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


class BucketLease(WorkdirLock):
  """The lease on a gs:// workdir (see the module docstring)."""

  def __init__(self, workdir: str, lease_seconds: float = LEASE_SECONDS,
               renew_seconds: float = RENEW_SECONDS, client=None):
    if not paths.is_bucket(workdir):
      raise ValueError(f"not a gs:// path: {workdir}")
    storage, self._errors = _storage(workdir)
    bucket, _, prefix = workdir[len(paths.BUCKET_PREFIX):].partition("/")
    prefix = prefix.strip("/")
    self.workdir = workdir
    self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
    self._bucket = (client or _client(storage, workdir)).bucket(bucket)
    self._name = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    self._token = uuid.uuid4().hex  # Tells our own record from another's.
    self._holder = None
    self._generation = None  # Of the object we last wrote; None when not held.
    # _clock() when our last successful write began (None: not held).
    # A monotonic clock, as wall-clock jumps must not move the holder's deadline.
    self._renewed_at = None
    self._renew_error: Exception | None = None  # Why the last renewal failed.
    self._mutex = threading.Lock()  # Renewals (thread) against release (main).
    self._stop = threading.Event()
    self._renewer = None
    self.lost: WorkdirLeaseLostError | None = None

  def acquire(self) -> str | None:
    self._holder = {**this_process(), "token": self._token}
    note = None
    for _ in range(3):  # A holder may release between our attempt and our look.
      try:
        self._write(0)  # Only if no lease object exists.
        break
      except self._errors.PreconditionFailed:
        pass
      except (self._errors.NotFound, self._errors.Forbidden) as e:  # The run's first write.
        raise ConfigError(
            f"--workdir={self.workdir}: cannot write there ({type(e).__name__}: the bucket "
            "does not exist, or these credentials may not write to it). Create the bucket or "
            "fix its permissions, or use another --workdir.") from None
      holder, generation = self._read()
      if generation is None:
        continue
      why = self._stale(holder)
      if why is None:
        raise WorkdirBusyError(
            f"--workdir={self.workdir} is in use by another run: {describe(holder)}, lease "
            f"until {_utc(holder['expires'])}. Wait for it to finish or stop it, or use another "
            "--workdir.")
      try:
        self._write(generation)  # Only if no one took it over since we read it.
      except (self._errors.PreconditionFailed, self._errors.NotFound):
        winner, _ = self._read()
        raise WorkdirBusyError(
            f"--workdir={self.workdir} is in use by another run: {describe(winner or {})}, "
            "which took over the stale lease first. Use another --workdir.") from None
      note = f"Took over {self.workdir} from a stale run ({describe(holder)}: {why})."
      break
    else:
      raise WorkdirBusyError(f"--workdir={self.workdir}: its lease keeps changing hands; "
                             "another run is starting there. Use another --workdir.")
    self._stop.clear()
    self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                     name=f"lease {self.workdir}")
    self._renewer.start()
    return note

  def _write(self, if_generation_match: int):
    """Writes our record with a fresh expiry, if the object's generation is
    `if_generation_match` (0: if there is no object)."""
    started = _clock()  # Before the expiry written: the deadline errs early.
    record = {**self._holder, "expires": time.time() + self.lease_seconds}
    blob = self._bucket.blob(self._name)
    blob.upload_from_string(json.dumps(record), content_type="application/json",
                            if_generation_match=if_generation_match)
    self._generation = blob.generation
    self._renewed_at = started

  def _read(self) -> tuple[dict | None, int | None]:
    """(the recorded holder, the object's generation), or (None, None) if no
    lease object exists. An unreadable record expires LEASE_SECONDS after its
    last write, as a holder that stopped renewing would."""
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None, None
    try:
      holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
      holder["expires"] = float(holder["expires"])
    except (self._errors.PreconditionFailed, self._errors.NotFound):
      return self._read()  # Rewritten or released while we read it: look again.
    except (ValueError, TypeError, KeyError):
      holder = {"pid": "?", "host": "?", "started": "?", "command": "unreadable run.lock",
                "expires": blob.updated.timestamp() + self.lease_seconds}
    return holder, blob.generation

  def _stale(self, holder: dict) -> str | None:
    """Why the holder's lease may be taken over, or None if it may not."""
    if holder["expires"] < time.time():
      return f"its lease expired at {_utc(holder['expires'])}"
    if not alive(holder):
      return "its process is gone"
    return None

  def renew(self):
    """Pushes the expiry forward; WorkdirLeaseLostError if another run has
    taken the lease meanwhile."""
    with self._mutex:
      if self.lost is not None:  # Not `check`: a renewal past the deadline may still land.
        raise self.lost
      if self._generation is None:
        return  # Released.
      started = _clock()
      try:
        self._write(self._generation)
        return
      except (self._errors.PreconditionFailed, self._errors.NotFound):
        pass
      holder, generation = self._read()
      if holder is not None and holder.get("token") == self._token:
        self._generation = generation  # Our own write whose reply was lost.
        self._renewed_at = started
        return
      self._generation = None
      self.lost = WorkdirLeaseLostError(
          f"--workdir={self.workdir} was taken over by another run "
          f"({describe(holder) if holder else 'its lease was deleted'}) while this one held "
          "it; this run stops. Make sure only one run uses a workdir.")
      raise self.lost

  def _renew_until_released(self):
    while not self._stop.wait(self.renew_seconds):
      try:
        self.renew()
        self._renew_error = None
      except WorkdirLeaseLostError:
        return  # `check` raises it at the next step.
      except Exception as e:  # A failed request: the lease outlasts several tries.
        self._renew_error = e
        continue

  def check(self):
    """Raises once another run took the lease, or once this run has gone so long
    without renewing it that another run may soon take it over. Cheap (no
    request): the loop calls it before every step."""
    if self.lost is not None:
      raise self.lost
    since = self._unrenewed_for()
    if since is None:
      return
    error = self._renew_error
    why = (f"last attempt: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
           if error is not None else "no renewal request has returned")
    raise WorkdirLeaseExpiredError(
        f"--workdir={self.workdir}: this run could not renew its lease for {since:.0f} s "
        f"({why}); a lease lasts {self.lease_seconds:.0f} s, after which another run may "
        "take the workdir over, so this run stops to avoid two runs writing it. Check this "
        "host's connection to GCS, then rerun the same command to resume from the last "
        "checkpoint.")

  def _unrenewed_for(self) -> float | None:
    """Seconds since our last successful write if they are past the lease less
    its margin (the run must stop), else None (also when nothing is held)."""
    renewed_at = self._renewed_at
    if renewed_at is None:
      return None
    since = _clock() - renewed_at
    return since if since >= self.lease_seconds * (1 - MARGIN_FRACTION) else None

  def release(self):
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
      self._renewer = None
    # Past the deadline another run may hold the lease (the emulator the tests
    # use ignores the generation precondition on deletes), and the requests
    # have likely been failing: it is left to expire.
    expired = self._unrenewed_for() is not None
    self._renewed_at = None
    with self._mutex:
      if self._generation is None:
        return
      try:
        if not expired:
          self._bucket.blob(self._name).delete(if_generation_match=self._generation)
      except (self._errors.PreconditionFailed, self._errors.NotFound):
        pass  # No longer ours: leave it to its holder.
      self._generation = None
