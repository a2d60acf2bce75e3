"""Metrics to WORKDIR/metrics.jsonl and TensorBoard, and a progress bar.

Only process 0 writes. metrics.jsonl has one JSON object per logged training
step and one per evaluation (always `step`, plus every scalar logged for it; an
evaluation's start with `eval_`) and is the interface that
experiments read; TensorBoard event files go to WORKDIR/tensorboard.

A bucket object cannot be appended to, so on gs:// workdirs metrics.jsonl is
rewritten whole at each logged step (a row is ~200 bytes: 10k rows rewrite
~2 MB), and so is the TensorBoard event file (~350 bytes a row of 7 scalars);
local files are appended to. Both are written with each row, so a kill loses
no row that a resume keeps.
"""
import dataclasses
import io
import json
import math
import os
import sys
import time

import jax
import numpy as np
import tqdm
from etils import epath

from bigjax import paths


class _RewrittenJsonl:
  """A bucket's metrics.jsonl: its lines, the file written whole after each."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._text = path.read_text() if path.exists() else ""

  def write(self, line: str):
    self._text += line
    self._path.write_text(self._text)

  def close(self):
    pass


class _BucketEventFile:
  """A TensorBoard event file in a bucket, uploaded whole at each flush. It
  replaces tensorboardX's own gs:// writer, which uploads again when collected;
  tensorboardX keeps every writer until exit (an atexit hook), so that upload
  came at interpreter exit, retried for minutes if the bucket was unreachable."""

  def __init__(self, path: str):
    self._path, self._buffer, self._closed = epath.Path(path), io.BytesIO(), False

  def write(self, data: bytes):
    self._buffer.write(data)

  def flush(self):
    if not self._closed:
      self._path.write_bytes(self._buffer.getvalue())

  def close(self):
    self.flush()
    self._closed = True


class _BucketEventFiles:
  """tensorboardX's writer factory interface, for gs:// paths."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str):
    pass  # A bucket has no directories to make.


class _EventFile:
  """TensorBoard scalars, each row on disk (or in the bucket) once written.
  tensorboardX's SummaryWriter hands events to a background thread whose queue
  its flush does not drain, so a kill lost the points a resume never writes
  again (it purges only past its checkpoint). The file starts with TensorBoard's
  purge marker at `purge_step`: the earlier attempts' points from there on are
  dropped, as metrics.jsonl is rewound."""

  def __init__(self, logdir: str, purge_step: int):
    from tensorboardX import record_writer  # Pure Python; no TensorFlow.
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    record_writer.register_writer_factory("gs", _BucketEventFiles())
    record_writer.directory_check(logdir)
    self._event, self._writer = event_pb2.Event, EventsWriter(os.path.join(logdir, "events"))
    self._writer.write_event(event_pb2.Event(
        step=purge_step, wall_time=time.time(),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, scalars: dict):
    from tensorboardX import summary
    for k, v in scalars.items():
      self._writer.write_event(self._event(step=step, wall_time=time.time(),
                                           summary=summary.scalar(k, v)))
    self._writer.flush()

  def close(self):
    self._writer.close()


def _scalar(v):
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v)  # Counts (skipped_updates, steps_averaged) stay whole numbers.
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf literals.


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None, resumed_at: int = 0):
    """`resumed_at`: the step a resumed run starts from. TensorBoard is told to
    drop the earlier attempt's points past it (a purge event), as metrics.jsonl
    is rewound there."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled and paths.is_remote(workdir):
      self._jsonl = _RewrittenJsonl(epath.Path(workdir) / "metrics.jsonl")
    elif self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if self.enabled:
      # A fresh start purges from step 0: an earlier attempt that saved no
      # checkpoint has its points dropped, as its metrics.jsonl rows are.
      self._tb = _EventFile(os.path.join(workdir, "tensorboard"),
                            purge_step=resumed_at + 1 if resumed_at else 0)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._tb.write(int(step), {k: float(np.asarray(v)) for k, v in scalars.items()})

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


@dataclasses.dataclass
class Rewind:
  """What `rewind_jsonl` dropped: rows past the resumed step (they run again)
  and lines that were not a complete JSON row (a kill cut them short, or the
  file was damaged), with the first such line's number."""
  past_rows: int = 0
  unreadable: int = 0
  first_unreadable_line: int | None = None

  def messages(self, step: int) -> list[str]:
    out = []
    if self.past_rows:
      where = (f"after step {step}, the checkpoint this run resumes from" if step > 0 else
               "of an earlier attempt that saved no checkpoint")
      out.append(f"metrics.jsonl: dropped {self.past_rows} row(s) {where}; those steps run "
                 "again.")
    if self.unreadable:
      out.append(f"metrics.jsonl: dropped {self.unreadable} unreadable line(s) (not a "
                 f"complete UTF-8 JSON row with a step; the first is line "
                 f"{self.first_unreadable_line}).")
    return out


def _row_step(raw: bytes) -> int | None:
  """The step of one complete metrics.jsonl line, or None if it is not one."""
  if not raw.endswith(b"\n"):
    return None  # Cut short by a kill.
  try:
    return int(json.loads(raw.decode("utf-8"))["step"])
  except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError.
    return None


def evaluation_at(workdir: str, step: int) -> dict:
  """The evaluation of `step` that metrics.jsonl holds ({"eval_loss": ...}), or
  {} if none (process 0 reads it; the others get {})."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return {}
  with path.open("rb") as f:
    rows = [raw for raw in f if _row_step(raw) == step and b'"eval_' in raw]
  if not rows:
    return {}
  return {k: v for k, v in json.loads(rows[-1]).items() if k.startswith("eval_")}


def rewind_jsonl(workdir: str, step: int) -> Rewind:
  """Drops metrics.jsonl rows past `step` (the checkpoint a run resumes from;
  -1 for a fresh start) and every line that is not a complete row, so that the
  file keeps one row per logged step once the lost steps run again. Read as
  bytes: one damaged byte must not stop every rerun."""
  path = epath.Path(workdir) / "metrics.jsonl"
  report = Rewind()
  if jax.process_index() != 0 or not path.exists():
    return report
  keep = []
  with path.open("rb") as f:
    for number, raw in enumerate(f, start=1):
      row_step = _row_step(raw)
      if row_step is not None and row_step <= step:
        keep.append(raw)
      elif row_step is not None:
        report.past_rows += 1
      elif raw.strip():
        report.unreadable += 1
        report.first_unreadable_line = report.first_unreadable_line or number
  if report.past_rows or report.unreadable:
    write_whole(path, b"".join(keep))
  return report


def write_whole(path: epath.Path, data: bytes | str):
  """`path` holds `data` or what it held before: written to a temporary file
  renamed into place (a bucket's object is replaced whole anyway). A failed write
  names the file (a write to an open file raises without one)."""
  try:
    if paths.is_remote(path):
      path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
      return
    with open(f"{path}.tmp", "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    os.replace(f"{path}.tmp", path)
  except OSError as e:
    if not paths.is_remote(path):
      epath.Path(f"{path}.tmp").unlink(missing_ok=True)
    if e.filename is not None:
      raise
    # gcsfs raises with a message only (errno None): keep it as the reason.
    raise OSError(e.errno, e.strerror or " ".join(str(e).split()), str(path)) from e


def read_jsonl(path: str) -> list[dict]:
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar on a terminal; plain log lines otherwise (CI, notebooks' logs)."""

  def __init__(self, total: int, initial: int, tokens_per_step: int, unit: str = "tokens"):
    self.tokens_per_step = tokens_per_step
    self.unit = unit
    self.enabled = jax.process_index() == 0
    self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=not (self.enabled and sys.stderr.isatty()))
    self._last_step, self._last_time = initial, time.perf_counter()

  def update(self, step: int, scalars: dict | None = None) -> float:
    """Advances to `step`; returns tokens (or examples) per second since the
    previous update."""
    now = time.perf_counter()
    rate = (step - self._last_step) * self.tokens_per_step / max(now - self._last_time, 1e-9)
    shown = {k: f"{float(v):.4g}" for k, v in (scalars or {}).items()}
    if scalars:  # Before the update, which draws the bar: this row's figures, not the last's.
      self.bar.set_postfix(shown | {f"{self.unit}/s": f"{rate:,.0f}"}, refresh=False)
    self.bar.update(step - self._last_step)
    self._last_step, self._last_time = step, now
    if scalars and self.enabled and self.bar.disable:
      print(f"step {step}: " + ", ".join(f"{k}={v}" for k, v in shown.items()) +
            f", {self.unit}/s={rate:,.0f}", flush=True)
    return rate

  def exclude(self, seconds: float):
    """Takes `seconds` spent outside training (an evaluation, a checkpoint save)
    out of the throughput of the window they fell in."""
    self._last_time += seconds

  def close(self):
    self.bar.close()
