r"""A finished (or running) training run's throughput: the median of the
`tokens_per_s` (or `examples_per_s`) values its training log wrote to
WORKDIR/metrics.jsonl, one per logging step.

  python -m bigjax.main --config=configs/lm.py:demo --workdir=/tmp/lm_demo
  python experiments/benchmarks/throughput.py --workdir=/tmp/lm_demo

The median is robust to the first interval, which includes compilation.
"""
import argparse
import os
import statistics

from bigjax import metrics


def median_rate(workdir: str) -> tuple[str, float, int]:
  """(key, median value, number of values) of the run's throughput."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise SystemExit(f"{path} does not exist: point --workdir at a training run's directory.")
  rows = metrics.read_jsonl(path)
  for key in ("tokens_per_s", "examples_per_s"):
    values = [r[key] for r in rows if key in r]
    if values:
      return key, statistics.median(values), len(values)
  raise SystemExit(f"{workdir}/metrics.jsonl has no tokens_per_s or examples_per_s rows.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  key, value, count = median_rate(args.workdir)
  print(f"{args.workdir}: median {key} = {value:,.0f} over {count} logging steps")


if __name__ == "__main__":
  main()
