r"""Trains the classic model-zoo configs and prints their results as a table.

  python experiments/zoo.py --root=/tmp/zoo            # ~1 minute on 2 CPU cores
  python experiments/zoo.py --root=/tmp/zoo --arg=runlocal   # seconds: a smoke run

Each entry runs `python -m bigjax.main` into ROOT/NAME and is read back from its
workdir (metrics.jsonl), like any run: a finished entry is skipped on rerun
(training resumes from its checkpoint and stops at once; its wall time shows as
-), so the table can be rebuilt for free. Extra `--config.*` overrides go after `--` and apply to every entry.
Below the table, one line per trained linear model: its w and b (from its latest
checkpoint) and numpy's least-squares fit to the same training data,
  linear_regression (step S): w = W, b = B; least squares: W_LS, B_LS
"""
import argparse
import json
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


def run_entry(name: str, config: str, root: str, extra: list[str]) -> float | None:
  """Trains one entry (or resumes it); returns the wall time in seconds, or None
  when the run had already finished (its time is not this invocation's)."""
  start = time.time()
  cmd = [sys.executable, "-m", "bigjax.main", f"--config={config}",
         f"--workdir={os.path.join(root, name)}", *extra]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
  return None if "Nothing to train: " in done.stdout else time.time() - start


def table(root: str, times: dict, arg: str = "", extra: tuple = ()) -> str:
  """The zoo's table; `arg` and `extra` are the config arg and overrides this
  invocation gave its runs (shown with their configs, so a runlocal table never
  reads as the full runs'; one it did not start is said to be as its config.json
  has it). A run that had finished before shows no wall time."""
  rows = ["| run | config | steps | result | wall s |", "|---|---|---|---|---:|"]
  for name, (config, key, label) in ENTRIES.items():
    path = os.path.join(root, name, "metrics.jsonl")
    evals = [r for r in metrics.read_jsonl(path) if key in r] if os.path.exists(path) else []
    result = f"{label} {evals[-1][key]:.4g}" if evals else "no evaluation yet"
    steps = evals[-1]["step"] if evals else "-"
    wall = "-" if times.get(name) is None else f"{times[name]:.0f}"
    # A run this invocation did not start may have had any arg: its config.json says.
    shown = (f"`{' '.join([_with_arg(config, arg), *extra])}`" if name in times else
             f"`{config}`, or as in its config.json" if evals else f"`{config}`")
    rows.append(f"| {name} | {shown} | {steps} | {result} | {wall} |")
  return "\n".join(rows)


def linear_fit(workdir: str) -> str:
  """'NAME (step S): w = ..., b = ...; least squares: w..., b' for a run of a linear
  model: w and b from its latest checkpoint, the least-squares line from numpy on
  the same training rows (columns, standardisation) the run trained on."""
  import jax
  import numpy as np

  from bigjax import checkpoint_reader
  from bigjax.data import examples

  with open(os.path.join(workdir, "config.json")) as f:
    d = json.load(f)["data"]
  x, y, _, _ = examples.load_train_eval(
      d["dataset"], d["train_split"], d["eval_split"], data_dir=d["data_dir"] or None,
      feature_key=d["feature_key"], label_key=d["label_key"],
      feature_columns=d["feature_columns"], standardize_features=d["standardize"])
  fit, *_ = np.linalg.lstsq(np.c_[x.astype(np.float64), np.ones(len(x))], y, rcond=None)
  reader = checkpoint_reader.CheckpointReader(workdir)
  try:
    step = reader.latest_step()
    if step is None:
      return f"{os.path.basename(workdir)}: no finished checkpoint yet"
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    targets = {f"params/head/dense/{k}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu)
               for k, a in reader.metadata(step)["params"]["head"]["dense"].items()}
    params = {k.rsplit("/", 1)[1]: np.asarray(v) for k, v in reader.restore(step, targets).items()}
  finally:
    reader.close()
  numbers = lambda a: ", ".join(f"{v:.3f}" for v in np.ravel(a))
  return (f"{os.path.basename(workdir)} (step {step}): w = {numbers(params['kernel'])}, "
          f"b = {numbers(params['bias'])}; least squares: {numbers(fit[:-1])}, "
          f"{numbers(fit[-1:])}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="Directory holding one workdir per run.")
  parser.add_argument("--arg", default="", help="Config arg added to every entry, e.g. "
                      "runlocal.")
  parser.add_argument("--only", default="", help="Comma-separated entry names to run.")
  args, extra = parser.parse_known_args(argv)
  args.root = os.path.abspath(args.root)  # The runs start in the checkout; the table reads here.
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
  print(table(args.root, times, args.arg, extra))
  for name in ENTRIES:  # Every linear model that has trained, as in the table.
    workdir = os.path.join(args.root, name)
    if os.path.exists(os.path.join(workdir, "config.json")):
      with open(os.path.join(workdir, "config.json")) as f:
        linear = json.load(f)["model"]["kind"] == "linear"
      if linear and os.path.isdir(os.path.join(workdir, "checkpoints")):
        print(linear_fit(workdir))


if __name__ == "__main__":
  main()
