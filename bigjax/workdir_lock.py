"""One run per workdir: a second run on the same --workdir is refused.

Two runs writing one workdir corrupt it quietly: both append to metrics.jsonl,
and the later one removes the other's save in progress as "unfinished". So a
run holds its workdir for as long as it trains:

- local paths: an OS lock (`fcntl.flock`) on WORKDIR/run.lock, which records the
  holder (pid, host, start time, command). The OS drops the lock when the
  holder's process ends, however it ends, so a killed run never blocks the next.
  If the lock is still held although the recorded process is gone (a child it
  forked inherited the lock), the holder is stale and is taken over.
- bucket paths (gs://...): a lease object, WORKDIR/run.lock, created and
  renewed under generation preconditions (bigjax/bucket_lease.py).

Only process 0 of a multi-process run takes the lock; `hold` tells every process
the outcome, so that all of them stop when the workdir is busy.
"""
import datetime
import fcntl
import json
import os
import secrets
import socket
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigjax import paths
from bigjax.config import ConfigError

LOCK_NAME = "run.lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """What a run needs from a workdir lock, whatever the storage."""

  def acquire(self) -> str | None:
    """Takes the workdir, or raises WorkdirBusyError naming the holder; returns a
    note to print (e.g. that a stale holder was taken over), or None."""
    raise NotImplementedError

  def check(self):
    """Raises WorkdirBusyError if another run has taken the workdir since
    `acquire`, or could take it (a lease not renewed in time); an OS lock is
    never lost."""

  def release(self):
    raise NotImplementedError


class UnlockedWorkdir(WorkdirLock):
  """Remote storage other than GCS: no lock, so the user is told once."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def acquire(self) -> str | None:
    return (f"Note: {self.workdir} is not locked (only local and gs:// workdirs are); make "
            "sure only one run uses it.")

  def release(self):
    pass


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), which tells a
  live holder from an unrelated process that reused its pid; None elsewhere."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_space() -> str | None:
  """Which pids this process can see (Linux): its boot and pid namespace. Two
  containers sharing a hostname (docker --uts=host, Kubernetes hostNetwork) but
  not their pids cannot tell whether the other's processes run."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def this_process() -> dict:
  """The record naming a holder: who it is, and how to tell it from a later
  process that reuses its pid."""
  pid = os.getpid()
  return {"pid": pid, "host": socket.gethostname(), "pid_space": _pid_space(),
          "process_start": _process_start(pid),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC"),
          "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300]}


def alive(holder: dict) -> bool:
  """Whether the recorded holder still runs (unknowable on another host or from
  another pid namespace: yes)."""
  if holder.get("host") != socket.gethostname():
    return True
  if holder.get("pid_space", _pid_space()) != _pid_space():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return True  # An unreadable record: assume the worst.
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Someone else's process: it exists.
  started = holder.get("process_start")
  return started is None or _process_start(pid) in (None, started)


def describe(holder: dict) -> str:
  if not holder:
    return "a process that left no record"
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
          f" ({holder.get('command')})")


class LocalWorkdirLock(WorkdirLock):
  """flock on WORKDIR/run.lock; the file's text names the holder."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> str | None:
    os.makedirs(self.workdir, exist_ok=True)
    fd, previous = self._lock(self.path)
    note = None
    if fd is None:
      if alive(previous):
        raise WorkdirBusyError(
            f"--workdir={self.workdir} is in use by another run: {describe(previous)}. "
            f"Wait for it to finish or stop it (kill {previous.get('pid')}), or use another "
            "--workdir.")
      fd, previous = self._take_over(previous)
      note = (f"Took over {self.workdir} from a stale run ({describe(previous)}: its "
              "process is gone).")
    elif previous:
      note = (f"Note: the previous run in {self.workdir} ended without releasing it "
              f"({describe(previous)}).")
    self._fd = fd
    self._record()
    return note

  def _lock(self, path: str) -> tuple[int | None, dict]:
    """(fd holding the lock or None if another process holds it, recorded holder).
    Retries if the file was replaced (a takeover) between opening and locking."""
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        return None, holder
      if _same_file(fd, path):
        return fd, _read(fd)
      os.close(fd)  # We locked a file that a takeover has just replaced.

  def _take_over(self, stale: dict) -> tuple[int, dict]:
    """Replaces a lock file whose holder is gone by a fresh one that we lock,
    under a second lock so that two runs never take over at once."""
    guard = os.open(self.path + ".takeover", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(guard, fcntl.LOCK_EX)
      fd, holder = self._lock(self.path)
      if fd is not None:  # The stale holder let go meanwhile.
        return fd, holder
      if holder != stale:  # Someone else took over first and holds it now.
        raise WorkdirBusyError(f"--workdir={self.workdir} is in use by another run: "
                               f"{describe(holder)}. Use another --workdir.")
      fresh = self.path + f".{os.getpid()}"
      fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os.replace(fresh, self.path)
      return fd, stale
    finally:
      os.close(guard)

  def _record(self):
    """Writes who holds the lock, for the message a second run prints."""
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(this_process()).encode(), 0)
    os.fsync(self._fd)

  def release(self):
    """Empties the record (a clean end) and unlocks. The file stays: deleting it
    would let a run lock a file that another has just replaced."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    return {"pid": "?", "host": "?", "started": "?", "command": "unreadable run.lock"}


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def for_workdir(workdir: str) -> WorkdirLock:
  """The lock for the workdir's storage, chosen by its scheme."""
  if paths.is_bucket(workdir):
    from bigjax import bucket_lease  # Needs the `gcs` extra, so only for gs:// paths.
    return bucket_lease.BucketLease(workdir)
  return UnlockedWorkdir(workdir) if paths.is_remote(workdir) else LocalWorkdirLock(workdir)


def hold(workdir: str, log) -> WorkdirLock:
  """Process 0 takes the workdir (logging any note); every process raises
  WorkdirBusyError if it is busy. Returns the lock to release at the end."""
  lock = for_workdir(workdir)
  refusal = None
  if jax.process_index() == 0:
    try:
      note = lock.acquire()
      if note:
        log(note)
    except (WorkdirBusyError, ConfigError) as e:  # ConfigError: an unwritable bucket.
      refusal = e
  if jax.process_count() > 1:
    busy = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if int(busy) and refusal is None:
      refusal = WorkdirBusyError(f"--workdir={workdir} is in use by another run (see "
                                 "process 0's message).")
  if refusal is not None:
    raise refusal
  try:
    _check_shared(workdir)
  except BaseException:
    lock.release()
    raise
  return lock


def _check_shared(workdir: str):
  """Raises ConfigError on every process unless all of them see one directory: a
  per-host local path would train, then hang at the first checkpoint (orbax waits
  20 minutes for the other hosts' files to appear where process 0 looks)."""
  if jax.process_count() == 1 or paths.is_remote(workdir):  # One URL: one bucket.
    return
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  probe = os.path.join(workdir, f".shared_probe_{token}")
  if jax.process_index() == 0:
    open(probe, "w").close()
  multihost_utils.sync_global_devices("bigjax: shared workdir probe written")
  seen = np.asarray(multihost_utils.process_allgather(np.int32(os.path.exists(probe))))
  if jax.process_index() == 0:  # Every process has looked: the gather waited for them.
    os.remove(probe)
  blind = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
  if blind:
    raise ConfigError(f"--workdir={workdir} is not one directory shared by the processes: "
                      f"process(es) {blind} cannot see the file process 0 wrote there. Use a "
                      "filesystem every host mounts (NFS, ...) or a gs:// bucket.")
