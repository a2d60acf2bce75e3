"""How the command line tells what went wrong, in one line: a --config.* override
naming no field of the config (the flag as typed, the section's keys or the close
match), an error raised inside the config file (its line), and a failed write
in the workdir (what, why, what to do)."""
import difflib
import errno
import os
import re
import sys
import threading
import traceback

from absl import flags
from ml_collections.config_flags import config_path


def frames_in(error: BaseException, config_file: str) -> list:
  """The error's traceback frames in the config file (none: it came from a
  --config.* override)."""
  path = os.path.abspath(config_file)
  return [f for f in traceback.extract_tb(error.__traceback__)
          if os.path.abspath(f.filename) == path]


def describe(error: BaseException, config_file: str) -> str:
  """'ErrorType: message (FILE line N)' in one line, located in the config file
  when the error came from it (else it came from a --config.* override)."""
  if isinstance(error, SyntaxError):
    return f"SyntaxError: {error.msg} ({error.filename} line {error.lineno})"
  text = error  # KeyError('x') inside AttributeError(...): unwrap to the words.
  while isinstance(text, BaseException) and len(text.args) == 1:
    text = text.args[0]
  text = str(text)
  message = f"{type(error).__name__}: {' '.join(text.split())}"
  in_config = frames_in(error, config_file)
  if in_config:
    return f"{message} ({in_config[-1].filename} line {in_config[-1].lineno})"
  return f"{message} (in a --config.* override)"


_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")  # As ml_collections finds them.


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
  """(the argument as typed, the config path it sets) of each --config.* override."""
  try:  # ml_collections reads --flagfile=... arguments too.
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except Exception:  # pylint: disable=broad-except  # absl reports a bad flagfile itself.
    pass
  return [(arg, arg.split("=", 1)[0].split(".", 1)[1])
          for arg in argv[1:] if _OVERRIDE.match(arg)]


def _path_text(parts) -> str:
  """('model', 'num_layers') -> 'model.num_layers'; ('rules', 0) -> 'rules[0]'."""
  text = ""
  for part in parts:
    text += f"[{part!r}]" if not isinstance(part, str) else f".{part}" if text else part
  return text


def _missing(config, arg: str, path: str) -> str | None:
  """Why the override `arg` (which sets `path`, e.g. 'model.lr') names no field
  of `config`, in sentences; None if the field exists."""
  try:
    parts = config_path.split(path)
  except ValueError:
    return f"{path!r} is not a config path. Write --config.SECTION.KEY=VALUE."
  node = config
  for i, part in enumerate(parts):
    name = _path_text(("config", *parts[:i]))
    if hasattr(node, "keys") and hasattr(node, "__contains__"):  # A ConfigDict.
      if part in node:
        node = node[part]
        continue
      keys = sorted(str(k) for k in node.keys())
      close = difflib.get_close_matches(str(part), keys, n=1)
      if close:  # The flag as typed, with the key corrected.
        fixed = _path_text((*parts[:i], close[0], *parts[i + 1:]))
        flag, eq, value = arg.partition("=")
        fixed_arg = f"{flag[:flag.index('config.') + 7]}{fixed}{eq}{value}"
        further = _missing(config, fixed_arg, fixed)
        if further is None:
          return f"{name} has no key {part!r}. Did you mean {fixed_arg}?"
        return f"{name} has no key {part!r} (did you mean {close[0]!r}?), and {further}"
      return f"{name} has no key {part!r}. Its keys: {', '.join(keys)}."
    if isinstance(node, tuple) and isinstance(part, int):
      return (f"{name} is a tuple, whose entries cannot be set one by one. Override it "
              f"whole: --{name}=(...).")
    if isinstance(node, list) and isinstance(part, int):
      if -len(node) <= part < len(node):
        node = node[part]
        continue
      return f"{name} has {len(node)} entries, none at [{part}]."
    return (f"{name} is {node!r} ({type(node).__name__}), not a section with keys. "
            f"Override it as a whole: --{name}=VALUE.")
  return None


def bad_override(argv: list[str], config_arg: str) -> str | None:
  """'--config.X.Y=V: config.X has no key 'Y'; ...' for the first override whose
  path the config file's config does not have, or None (all of them exist)."""
  try:
    config = flags.FLAGS["config"].parser.parse(config_arg)  # The config file's config.
    for arg, path in _overrides(argv):
      problem = _missing(config, arg, path)
      if problem:
        return f"{arg}: {problem}"
  except Exception:  # pylint: disable=broad-except  # Then the error's own words.
    pass
  return None


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # No space left; file too large; quota.


def quiet_follow_on_errors():
  """Once a failed write is reported: background writers failing on the same
  disk as the process exits (TensorBoard's event file, flushed at exit and in a
  thread) add no tracebacks after that line."""
  unraisable, thread_hook = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: (None if isinstance(u.exc_value, OSError) else unraisable(u))
  threading.excepthook = lambda a: (None if isinstance(a.exc_value, OSError) else thread_hook(a))


def os_error_line(error: OSError, workdir: str) -> str:
  """One line for an OSError out of a run: what failed, why, and what to do."""
  path = None if error.filename is None else os.fsdecode(error.filename)
  reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
  # A file outside the workdir (the data, an init_from source): another workdir
  # would not help.
  elsewhere = path is not None and not os.path.abspath(path).startswith(
      os.path.join(os.path.abspath(workdir), ""))
  if error.errno in _NO_SPACE:
    what = f"writing {path}" if path else f"writing in --workdir={workdir}"
    fix = "free space" + ("" if elsewhere else " or choose another --workdir")
  else:
    what = f"using {path}" if path else "a file operation"
    fix = ("fix that (permissions, a read-only or failing disk, the network)" +
           ("" if elsewhere else " or choose another --workdir"))
  return f"Error: {what} failed ({reason}): {fix}; rerun the same command to resume."
