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
collectives use gloo (JAX's default).
"""
import os

import jax

ENV_COORDINATOR = "BIGJAX_COORDINATOR"
ENV_NUM_PROCESSES = "BIGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BIGJAX_PROCESS_ID"
ENV_AUTO = "BIGJAX_DISTRIBUTED"
# Seconds a process waits for the others to join (JAX's default is 300).
ENV_INIT_TIMEOUT = "BIGJAX_INIT_TIMEOUT"


def _int(environ, name: str) -> int:
  value = environ.get(name)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{ENV_COORDINATOR} is set, so {name} must be an integer; got "
                     f"{value!r}. Set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} too "
                     "(experiments/launch_multihost.py does).") from None


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
    kwargs["initialization_timeout"] = int(environ[ENV_INIT_TIMEOUT])
  coordinator = environ.get(ENV_COORDINATOR)
  if coordinator:
    num, pid = _int(environ, ENV_NUM_PROCESSES), _int(environ, ENV_PROCESS_ID)
    if not 0 <= pid < num:
      raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num}).")
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid, **kwargs)
    return True
  auto = environ.get(ENV_AUTO, "").strip().lower()
  if auto in ("auto", "1", "true", "yes"):
    jax.distributed.initialize(**kwargs)
    return True
  if auto not in ("", "0", "false", "no"):
    raise ValueError(f"{ENV_AUTO}={environ[ENV_AUTO]!r}: use 'auto' (let JAX detect the "
                     "cluster) or leave it unset.")
  return False
