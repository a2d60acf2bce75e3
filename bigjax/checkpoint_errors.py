"""How checkpoint problems are told: the errors, each reported in one line, and
the library output that would bury them.

A failed save makes orbax log the same exception several times with long
tracebacks from background threads, and leaves tensorstore callbacks and write
coroutines that print more when they find the event loop closed or are
collected at exit: over a thousand lines for one full disk. bigjax keeps the
first exception for its own report and drops that noise (and nothing else).
"""
import json
import logging
import os
import re
import sys
import traceback
import warnings

from bigjax import recorded_config
from bigjax.config import ConfigError


class CheckpointMismatchError(ConfigError):
  """The checkpoint's arrays do not fit this run's state (another model)."""


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
  """(dotted name, old value, new value) of every leaf that differs between two
  configs as JSON dicts, in name order."""
  out = []
  for k in sorted(set(old) | set(new)):
    x, y = old.get(k), new.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out += changed_fields(x, y, f"{prefix}{k}.")
    elif x != y:
      out.append((f"{prefix}{k}", x, y))
  return out


def config_diff(workdir: str, config) -> str:
  """What a CheckpointMismatchError adds: the model and optimizer fields of
  `config` that differ from the run's WORKDIR/config.json, as '\nConfig fields
  that differ ...: model.emb_dim: 64 in config.json, 128 now; ...', or ''."""
  try:
    old = recorded_config.read(workdir)  # With the settings an older run predates.
  except (OSError, ValueError):
    return ""
  new = json.loads(config.to_json_best_effort())
  diffs = [(name, x, y) for name, x, y in changed_fields(old, new)
           if name.startswith("model.") or name in ("optim.name", "optim.nan_policy")]
  return ("\nConfig fields that differ from the run's config.json: " +
          "; ".join(f"{name}: {x!r} in config.json, {y!r} now" for name, x, y in diffs)
          if diffs else "")


class CheckpointDamagedError(RuntimeError):
  """A checkpoint does not read back as it was saved (a truncated or missing
  file, flipped bytes, non-finite values), or no intact checkpoint is left."""

  def __init__(self, message: str, step: int | None = None, problem: str = ""):
    super().__init__(message)
    self.step, self.problem = step, problem


class CheckpointReadError(RuntimeError):
  """A checkpoint could not be read for a reason outside it (host memory, the
  network, permissions): its files verify, or could not be read to verify. It is
  left where it is; rerunning resumes from it."""


class CheckpointSaveError(RuntimeError):
  """A save failed (often a full disk); the message names the last good step."""


class OrbaxErrorCatcher(logging.Filter):
  """Keeps the first exception orbax logs from its background save threads and
  drops those records (each a long traceback, several per failure): bigjax
  reports the failure itself, in one line, at the next step boundary."""

  def __init__(self):
    super().__init__()
    self.error: BaseException | None = None
    self.abandoned: str | None = None  # Once closed: the failed save's directory.

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    exception = record.exc_info[1] if record.exc_info else None
    if self.abandoned is not None:  # Only the failed save's late writes: another
      text = f"{record.getMessage()} {exception}"  # save's are its own catcher's.
      return self.abandoned.rstrip("/") + "/" not in text
    if self.error is None and exception is not None:
      self.error = exception
    return False

  def abandoned_under(self, directory) -> bool:
    return self.abandoned is not None and self.abandoned.startswith(
        os.fspath(directory).rstrip("/") + "/")


_ABANDONED = ("Event loop is closed", "sys.meta_path is None")


def _orbax_task_never_retrieved(record: logging.LogRecord) -> bool:
  """asyncio's 'Task/Future exception was never retrieved' for an orbax write:
  a Task names its orbax coroutine; a bare Future only its exception, whose
  traceback runs through orbax."""
  message = record.getMessage()
  if "exception was never retrieved" not in message:
    return False
  error = record.exc_info[1] if record.exc_info else None
  frames = traceback.extract_tb(error.__traceback__) if error is not None else []
  return "orbax" in message or any("orbax" in frame.filename for frame in frames)


def quiet_abandoned_writes():
  """After a failed save, tensorstore's remaining write callbacks find orbax's
  event loop closed, asyncio collects orbax's failed write tasks, and at exit
  its unfinished write coroutines are collected: each prints a traceback
  (hundreds in all) that says nothing new. Those, and only those, are dropped
  (once per process); the failure itself is reported by Checkpointer."""
  previous = sys.unraisablehook
  if getattr(previous, "bigjax_quiet", False):
    return

  def hook(unraisable):
    if not any(text in str(unraisable.exc_value) for text in _ABANDONED):
      previous(unraisable)

  hook.bigjax_quiet = True
  sys.unraisablehook = hook
  warnings.filterwarnings(  # Printed at exit for each write never started.
      "ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning)
  logging.getLogger("asyncio").addFilter(
      lambda record: not _orbax_task_never_retrieved(record))


def mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:,.1f} MiB"


def one_line(error: BaseException, limit: int = 300) -> str:
  """An exception as one line of at most `limit` chars. orbax wraps tensorstore's
  errors ("Encountered error while reading array index ..."): the innermost
  cause says what is wrong ("OUT_OF_RANGE: ... byte range ... not valid")."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split()) or type(error).__name__
  # tensorstore appends the whole spec as JSON (~700 chars) after the reason.
  text = re.sub(r" ?\[tensorstore_spec='[^']*'\]", "", text)
  if len(text) <= limit:
    return text
  # The reason ("File too large", "No space left on device") comes last.
  return f"{text[:limit // 2]} ... {text[-limit // 2:]}"
