"""What the benchmark scripts share: round-robin timing and argument checks."""
import argparse
import statistics
import time


def median_round_robin(runs: dict, rounds: int) -> dict:
  """{name: median seconds} of each (warmed-up) zero-argument run, the runs taken
  in turn for `rounds` rounds, so that a shared machine's slow drifts hit them all."""
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def at_least_one(text: str) -> int:
  """argparse type: an int >= 1."""
  if int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
  return int(text)
