r"""Command line: train (or resume) a run from a config file.

  python -m bigjax.main --config=configs/lm.py:runlocal --workdir=/tmp/run \
      --config.model.num_layers=4 --config.mesh.data=2

The workdir identifies the run: the same command resumes it from its latest
checkpoint. Unknown or mistyped --config.* keys are errors (the config is locked).
"""
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# `configs/` sits next to `bigjax/`; config files import `configs.common`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigjax import cli_errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:runlocal.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def summarize(result, config, workdir: str):
  """Prints what a researcher checks first: the loss curve, the task's report
  (bits/byte vs unigram entropy and a sample for language models, the final
  evaluation for the others) and the MoE router metrics."""
  import jax
  from bigjax import report

  if jax.process_index() != 0:
    return
  png = report.plot_loss_curve(workdir)
  print(f"Loss curve: {png}")
  for line in result.setup.task.report(config, result.eval_metrics, result.data_stats,
                                       result.setup, result.state):
    print(line)
  for line in report.router_metrics_lines(workdir):
    print(line)


def _config_arg(argv: list[str]) -> str:
  """The --config value as typed (for messages only)."""
  for i, arg in enumerate(argv):
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else ""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config file that cannot be loaded (missing,
  a syntax error, a get_config that raises) reported in one line naming the file
  and the error instead of a traceback."""
  config_arg = _config_arg(argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # ml_collections puts get_config's traceback in it.
      message = f"--config={config_arg}: {_last_line(message)}"
    sys.exit(f"Error: {message}")
  except Exception as e:  # pylint: disable=broad-except  # The config file or an override.
    config_file = config_arg.split(":", 1)[0]
    if not cli_errors.frames_in(e, config_file):
      if isinstance(e, OSError):  # An override read a config file that failed to load.
        _exit_unloadable(config_arg, e)
      bad = cli_errors.bad_override(argv, config_arg)
      if bad:  # A --config.* path that the config does not have: name that flag.
        sys.exit(f"Error: {bad}")
    sys.exit(f"Error: --config={config_arg}: {cli_errors.describe(e, config_file)}.")
  try:
    _CONFIG.value.get("seed")  # A config file that failed to load raises only when read.
  except OSError as e:
    _exit_unloadable(config_arg, e)
  return rest


def _exit_unloadable(config_arg: str, error: OSError):
  path = config_arg.split(":", 1)[0]
  problem = ("no such file (paths are relative to the current directory)"
             if not os.path.exists(path) else _last_line(error.__cause__ or error))
  sys.exit(f"Error: --config={config_arg}: {problem}.")


def _exit(message: str):
  """sys.exit(message), but at once in a multi-process job (os._exit): at
  interpreter exit jax.distributed's shutdown barrier would wait for the other
  processes, which wait for this one in their next collective, so the job would
  hang until the barrier's timeout (minutes) and then abort. The launcher, or the
  cluster, sees this process end and stops the others."""
  import jax
  if not jax.distributed.is_initialized():
    sys.exit(message)
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


def main(argv):
  del argv
  from bigjax import checkpoint, config as config_lib, host_memory, loop, train, workdir_lock

  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.

  # Library chatter (orbax logs every save at INFO) stays out of the way;
  # bigjax prints what a researcher needs on process 0.
  absl_logging.set_verbosity(absl_logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    result = train.run(config, workdir)
    if not (result.preempted or result.already_finished):
      summarize(result, config, workdir)  # Writes the loss curve into the workdir.
  except (workdir_lock.WorkdirBusyError,  # Another run holds the workdir.
          checkpoint.CheckpointDamagedError,  # No intact checkpoint is left.
          checkpoint.CheckpointReadError,  # An intact one could not be read (memory, ...).
          checkpoint.CheckpointSaveError) as e:  # A save failed (a full disk).
    _exit(f"Error: {e}")
  except config_lib.ConfigError as e:  # Bad input: the message says what to fix.
    _exit(f"Invalid config: {e}")
  except loop.NonFiniteError as e:  # nan_policy="halt"
    _exit(f"Halted: {e}")
  except OSError as e:  # A write in the workdir failed (config.json, metrics.jsonl): a full disk.
    cli_errors.quiet_follow_on_errors()
    _exit(cli_errors.os_error_line(e, workdir))
  except Exception:  # A bug: in a multi-process job, its traceback and out at once (_exit).
    import jax
    if not jax.distributed.is_initialized():
      raise
    traceback.print_exc()
    _exit("Error: this process failed (traceback above).")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
