"""XLA flags bigjax sets for the CPU backend, before JAX creates it.

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: by default XLA:CPU
orders independent operations so that the runtime can run them at the same time
on its threads; the matmul library under each of them already uses every core,
so two matmuls at once contend for the same cores and caches. Ordering for memory
instead made the GPT-2 train step of experiments/benchmarks/peer.py 15-20% faster
on 2 cores. Only the order of the same operations changes, not their results
(tests/test_xla_flags.py).

A value the user already put in XLA_FLAGS wins, and BIGJAX_KEEP_XLA_FLAGS=1
leaves XLA_FLAGS alone. The flags take effect only if bigjax is imported before
JAX starts its backends (as `python -m bigjax.main` and the tests do).
"""
import os

CPU_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def apply(env=os.environ) -> str:
  """Adds CPU_FLAGS to env["XLA_FLAGS"] where the user has not set them; returns it."""
  flags = env.get("XLA_FLAGS", "")
  if env.get("BIGJAX_KEEP_XLA_FLAGS") == "1":
    return flags
  for name, value in CPU_FLAGS.items():
    if f"--{name}=" not in flags:
      flags = f"{flags} --{name}={value}".strip()
  env["XLA_FLAGS"] = flags
  return flags
