"""What the benchmark scripts share: round-robin timing and argument checks."""
import argparse
import random
import statistics
import time


def median_round_robin(runs: dict, rounds: int) -> dict:
  """{name: median seconds} of each (warmed-up) zero-argument run, the runs taken
  in turn for `rounds` rounds, so that a shared machine's slow drifts hit them all,
  in an order shuffled every round (seeded), so that no run always follows the
  same one."""
  times = {name: [] for name in runs}
  for i in range(rounds):
    for name in round_order(runs, i):
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def round_order(items, i: int) -> list:
  """The items in round i's order: shuffled, seeded by the round."""
  items = list(items)
  return random.Random(i).sample(items, len(items))


def at_least_one(text: str) -> int:
  """argparse type: an int >= 1."""
  if int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
  return int(text)
