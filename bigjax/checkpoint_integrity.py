"""Is a checkpoint the one that was saved? Checksums of its bytes, and finiteness.

Orbax and tensorstore store no checksums of the array data (a flipped byte in an
OCDBT data file restores silently as wrong values), so bigjax records one per
file: when a save's arrays are all written and before orbax renames the step
into place, `write` puts STEP/bigjax_checksums.json (size and CRC-32 of every
file of the step) inside it. A finalised step therefore always carries its
checksums, and `damage` finds a flipped byte, a truncated or a missing file
before anything is read; a step without its record, beside steps with theirs,
is damage too, since nothing could show that its files are the ones saved (a
workdir whose steps all lack one predates the records: restored with a warning). Checksums are per file,
not per array, so that a checkpoint restores onto any mesh: the files are the
same whatever reads them.

The record also says whether the saved state was good (its training loss
finite), which decides which checkpoint must never be rotated out.
"""
import json
import logging
import zlib

import jax
import jax.numpy as jnp
from etils import epath

from bigjax import optim

CHECKSUMS = "bigjax_checksums.json"
# Files orbax may (re)write after the checksums: small metadata, not arrays.
_UNCHECKED = {CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"}
_CHUNK = 16 << 20


def _crc32(path: epath.Path) -> tuple[int, str]:
  """(size, CRC-32 as 8 hex digits) of a file, read in chunks."""
  crc, size = 0, 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return size, f"{crc:08x}"


def step_files(step_dir: epath.Path, prefix: str = "") -> dict[str, epath.Path]:
  """{path relative to the step: path} of every checked file of a step (walked
  level by level: epath has no recursive glob on buckets)."""
  out = {}
  for path in step_dir.iterdir():
    if path.is_dir():
      out.update(step_files(path, f"{prefix}{path.name}/"))
    elif path.name not in _UNCHECKED:
      out[prefix + path.name] = path
  return out


def write(step_dir: epath.Path, *, good: bool):
  """Records the checksums of every file now in `step_dir` (a finished save)."""
  files = {name: list(_crc32(path)) for name, path in sorted(step_files(step_dir).items())}
  record = {"format": 1, "good": good, "files": files}
  (step_dir / CHECKSUMS).write_text(json.dumps(record, indent=0))


def read(step_dir: epath.Path) -> dict | None:
  """The step's record, or None if it has none; ValueError if it is unreadable
  (not JSON, or JSON of another shape: a flipped byte can leave valid JSON)."""
  try:
    record = json.loads((step_dir / CHECKSUMS).read_text())
  except FileNotFoundError:
    return None
  files = record.get("files") if isinstance(record, dict) else None
  if not (isinstance(files, dict) and isinstance(record.get("good", True), bool) and all(
      isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
      and isinstance(entry[1], str) for entry in files.values())):
    raise ValueError("not a record of {'good': bool, 'files': {name: [size, crc]}}")
  return record


def unverified(step_dir: epath.Path) -> bool:
  """Whether the step predates checksums: it has no record, and neither has any
  step beside it (a run saved with this code has one in every step, so one step
  lacking it among recorded ones was tampered with: `damage`). Such a step is
  restored with a warning, not set aside: nothing shows it is damaged."""
  if (step_dir / CHECKSUMS).exists():
    return False
  return not any(p != step_dir and p.name.isdigit() and (p / CHECKSUMS).exists()
                 for p in step_dir.parent.iterdir())


def warn_if_unverified(step_dir: epath.Path):
  """One line (process 0) when the step about to be read is `unverified`."""
  if jax.process_index() == 0 and unverified(step_dir):
    logging.warning("Checkpoint %s has no checksum record (saved before bigjax wrote them): "
                    "its files cannot be verified; reading it as it is.", step_dir)


def is_good(step_dir: epath.Path) -> bool:
  """Whether the state saved there was good: its record says so, or it predates
  records (`unverified`). A damaged record makes it never the one to keep."""
  try:
    record = read(step_dir)
  except (OSError, ValueError):
    return False
  return unverified(step_dir) if record is None else bool(record.get("good", True))


def damage(step_dir: epath.Path) -> str | None:
  """What differs from when the step was saved, in a few words, or None if
  nothing does (or nothing can tell: an `unverified` step's callers warn).
  An OSError reading the files (permissions, the network) says nothing about
  them and is raised as it is; a record that is not JSON is damage."""
  try:
    record = read(step_dir)
  except ValueError as e:
    return f"its {CHECKSUMS} is unreadable: {e}"
  if record is None:
    if unverified(step_dir):
      return None
    # `write` runs before orbax finalises a step, so every step this code saves
    # has a record: one without it, beside steps with theirs, was altered, and
    # its files (a flipped byte restores silently) cannot be verified.
    return (f"its checksum record {CHECKSUMS} is missing, so its files cannot be verified "
            "(the steps beside it have theirs)")
  for name, (size, crc) in record["files"].items():
    path = step_dir / name
    if not path.exists():
      return f"file {name} is missing"
    now_size, now_crc = _crc32(path)
    if now_size != size:
      return f"file {name} has {now_size} bytes, {size} when saved (truncated or overwritten)"
    if now_crc != crc:
      return f"file {name} has other bytes than when saved (CRC-32 {now_crc}, saved {crc})"
  return None


def first_nonfinite(tree) -> str | None:
  """The name ('params/decoder/...') of the first floating-point array holding a
  NaN or Inf, or None if all are finite. One small jitted reduction per array."""
  named = [(optim.path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in named])
  for (name, _), ok in zip(named, jax.device_get(finite)):
    if not ok:
      return name
  return None
