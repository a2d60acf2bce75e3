"""Multi-process (multi-host) start-up, driven by environment variables.

`train.run` calls `initialize_from_env()` before anything touches a JAX backend,
so the same `python -m bigjax.main ...` command runs as one process or as one of
many:

  BIGJAX_COORDINATOR=host:port  BIGJAX_NUM_PROCESSES=N  BIGJAX_PROCESS_ID=i
      explicit: jax.distributed.initialize(host:port, N, i). What
      experiments/launch_multihost.py sets for the local processes it spawns.
  BIGJAX_DISTRIBUTED=auto
      jax.distributed.initialize() with no arguments: JAX detects the cluster
      (Cloud TPU VM slices, SLURM, Open MPI). Run the same command on every host.

Neither set: a single process, nothing to initialise. On CPU, cross-process
collectives use gloo (JAX's default). BIGJAX_NUM_PROCESSES or BIGJAX_PROCESS_ID
without BIGJAX_COORDINATOR is an error, not a single process: each host would
otherwise train alone. Bad values raise EnvError, a ConfigError, which
`python -m bigjax.main` prints in one line.
"""
import json
import os
import socket

import jax
import numpy as np

from bigjax import config as config_lib

ENV_COORDINATOR = "BIGJAX_COORDINATOR"
ENV_NUM_PROCESSES = "BIGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BIGJAX_PROCESS_ID"
ENV_AUTO = "BIGJAX_DISTRIBUTED"
# Seconds a process waits for the others to join (JAX's default is 300).
ENV_INIT_TIMEOUT = "BIGJAX_INIT_TIMEOUT"


class EnvError(config_lib.ConfigError):
  """A BIGJAX_* variable is missing, malformed or conflicts with another."""


def _int(environ, name: str, what: str, minimum: int, example: str = "") -> int:
  value = environ.get(name)
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < minimum:
    got = "it is not set" if value is None else f"got {name}={value!r}"
    raise EnvError(f"{name} must be {what}, an integer >= {minimum}{example}; {got}.")
  return number


def _check_port_free(coordinator: str, port: int):
  """Process 0 serves the coordinator on `port` (on every interface, address
  reuse on, as gRPC binds it); JAX 0.12 crashes (SIGSEGV) when it is taken."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise EnvError(f"{ENV_COORDINATOR}={coordinator}: process 0 cannot listen on port "
                     f"{port} ({e.strerror}); pick a free port.") from None


def initialize_from_env(environ=None) -> bool:
  """Initialises jax.distributed when the environment asks for it.

  Returns True if this process is (now) part of a multi-process job. Safe to
  call twice. Must run before the first JAX computation or device query.
  """
  environ = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if environ.get(ENV_INIT_TIMEOUT):
    kwargs["initialization_timeout"] = _int(environ, ENV_INIT_TIMEOUT, "in seconds", 1,
                                            " such as 300 (no unit)")
  coordinator = environ.get(ENV_COORDINATOR)
  if coordinator:
    num = _int(environ, ENV_NUM_PROCESSES, "the number of processes", 1)
    pid = _int(environ, ENV_PROCESS_ID, "this process's index", 0)
    if pid >= num:
      raise EnvError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num}).")
    host, _, port = coordinator.strip().rpartition(":")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
      raise EnvError(f"{ENV_COORDINATOR}={coordinator!r} must be HOST:PORT, process 0's "
                     "address and a free port on it, e.g. 10.0.0.1:12345.")
    if pid == 0:
      _check_port_free(coordinator, int(port))
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid, **kwargs)
    return True
  auto = environ.get(ENV_AUTO, "").strip().lower()
  if auto not in ("", "0", "false", "no", "auto", "1", "true", "yes"):
    raise EnvError(f"{ENV_AUTO}={environ[ENV_AUTO]!r}: use 'auto' (let JAX detect the "
                   "cluster) or leave it unset.")
  use_auto = auto in ("auto", "1", "true", "yes")
  # Without a coordinator these two would be ignored: each host would run alone
  # (or, with auto, JAX's detected values would silently win over them).
  stray = [f"{name}={environ[name]}" for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID)
           if environ.get(name)]
  if stray:
    them = "them" if len(stray) > 1 else "it"
    fix = (f"unset {them}, as {ENV_AUTO}=auto detects the process count and index itself"
           if use_auto else
           f"set {ENV_COORDINATOR}=HOST:PORT (process 0's address) on every process too "
           f"(experiments/launch_multihost.py sets all three), or unset {them} to run a "
           "single process")
    raise EnvError(f"{' and '.join(stray)} set without {ENV_COORDINATOR}: {fix}.")
  if use_auto:
    try:
      jax.distributed.initialize(**kwargs)
    except ValueError as e:  # Nothing to detect: no TPU slice, SLURM or MPI job here.
      raise EnvError(
          f"{ENV_AUTO}=auto: JAX found no cluster to join here ({e}). It detects TPU "
          f"slices, SLURM and Open MPI jobs; elsewhere set {ENV_COORDINATOR}, "
          f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} instead "
          "(experiments/launch_multihost.py sets them).") from None
    return True
  return False


def check_same_config(config):
  """Raises ConfigError on every process unless all of them were given process
  0's config. Each process builds its own copy of the model from its own config:
  a different seed or learning rate would train diverging copies silently, a
  different total_steps would abort in a collective minutes later. (The workdir
  may be named otherwise on another host, e.g. a mount point: workdir_lock checks
  that all of them see one directory.)"""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  from bigjax.checkpoint_errors import changed_fields

  mine = json.dumps({"config": json.loads(config.to_json_best_effort())},
                    sort_keys=True).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(mine))))
  theirs = np.zeros(size, np.uint8)  # Process 0's text, the same size on every process.
  if jax.process_index() == 0:
    theirs[:] = np.frombuffer(mine, np.uint8)
  theirs = np.asarray(multihost_utils.broadcast_one_to_all(theirs)).tobytes()
  same = theirs == mine
  differ = [i for i, ok in enumerate(np.asarray(multihost_utils.process_allgather(
      np.int32(same))).reshape(-1)) if not ok]
  if not differ:
    return
  here = ""
  if not same:
    changed = changed_fields(json.loads(theirs), json.loads(mine))
    here = " Here: " + "; ".join(f"{name} {new!r}, process 0 {old!r}"
                                 for name, old, new in changed[:6]) + "."
  raise config_lib.ConfigError(
      f"process(es) {differ} were given another config than process 0.{here} "
      "Run the same command, with the same --config.* flags, on every process.")
