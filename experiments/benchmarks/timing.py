"""What the benchmark scripts share: round-robin timing and argument checks."""
import argparse
import statistics
import time


def median_round_robin(runs: dict, rounds: int) -> dict:
  """{name: median seconds} of each (warmed-up) zero-argument run, the runs taken
  in turn for `rounds` rounds, so that a shared machine's slow drifts hit them all,
  in `round_order`, so that every run goes first as often as any other."""
  times = {name: [] for name in runs}
  for i in range(rounds):
    for name in round_order(runs, i):
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def round_order(items, i: int) -> list:
  """Round i's order: the items rotated by i // 2, reversed in odd rounds. Every
  item takes every place equally often (two items: AB, BA, BA, AB, AB, ...), and
  no item always follows the same one. (Seeded shuffles, earlier, put the same
  item first in 4 of 5 rounds.)"""
  items = list(items)
  shift = (i // 2) % len(items)
  order = items[shift:] + items[:shift]
  return order[::-1] if i % 2 else order


def at_least_one(text: str) -> int:
  """argparse type: an int >= 1."""
  if int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
  return int(text)
