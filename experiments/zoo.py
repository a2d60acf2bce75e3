r"""Trains the classic model-zoo configs and prints their results as a table.

  python experiments/zoo.py --root=/tmp/zoo            # ~1 minute on 2 CPU cores
  python experiments/zoo.py --root=/tmp/zoo --arg=runlocal   # seconds: a smoke run

Each entry runs `python -m bigjax.main` into ROOT/NAME and is read back from its
workdir (metrics.jsonl), like any run: a finished entry is skipped on rerun
(training resumes from its checkpoint and stops at once), so the table can be
rebuilt for free. Extra `--config.*` overrides go after `--` and apply to every entry.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bigjax import metrics  # noqa: E402  (after the path setup above)

# name -> (config file and arg, the number to show: a metrics.jsonl key and label).
ENTRIES = {
    "mlp_binary": ("configs/mlp.py:variant=binary", "eval_accuracy", "test accuracy"),
    "mlp_deep": ("configs/mlp.py:variant=deep", "eval_accuracy", "test accuracy"),
    "cnn_digits": ("configs/cnn.py", "eval_accuracy", "test accuracy"),
    "linear_regression": ("configs/linear_regression.py", "eval_loss", "test MSE"),
}


def _with_arg(config: str, arg: str) -> str:
  if not arg:
    return config
  return f"{config},{arg}" if ":" in config else f"{config}:{arg}"


def run_entry(name: str, config: str, root: str, extra: list[str]) -> float:
  """Trains one entry (or resumes it); returns the wall time in seconds."""
  start = time.time()
  cmd = [sys.executable, "-m", "bigjax.main", f"--config={config}",
         f"--workdir={os.path.join(root, name)}", *extra]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
  return time.time() - start


def table(root: str, times: dict) -> str:
  rows = ["| run | config | steps | result | wall s |", "|---|---|---|---|---:|"]
  for name, (config, key, label) in ENTRIES.items():
    path = os.path.join(root, name, "metrics.jsonl")
    evals = [r for r in metrics.read_jsonl(path) if key in r] if os.path.exists(path) else []
    result = f"{label} {evals[-1][key]:.4g}" if evals else "no evaluation yet"
    steps = evals[-1]["step"] if evals else "-"
    wall = f"{times[name]:.0f}" if name in times else "-"
    rows.append(f"| {name} | `{config}` | {steps} | {result} | {wall} |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="Directory holding one workdir per run.")
  parser.add_argument("--arg", default="", help="Config arg added to every entry, e.g. "
                      "runlocal.")
  parser.add_argument("--only", default="", help="Comma-separated entry names to run.")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  names = [n for n in args.only.split(",") if n] or list(ENTRIES)
  unknown = sorted(set(names) - set(ENTRIES))
  if unknown:
    raise SystemExit(f"--only: unknown entries {unknown}; known: {sorted(ENTRIES)}.")
  times = {}
  for name in names:
    config = _with_arg(ENTRIES[name][0], args.arg)
    print(f"{name}: {config}", flush=True)
    times[name] = run_entry(name, config, args.root, extra)
  print(table(args.root, times))


if __name__ == "__main__":
  main()
