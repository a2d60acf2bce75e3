"""The host allocator on CPU runs: keep the memory each step frees for the next.

XLA:CPU allocates a step's temporaries with malloc (one block for most of them,
128 MiB for peer.py's MoE layer) and frees them when the step ends. glibc maps
allocations above 32 MiB afresh from the kernel each time and unmaps them on
free, and its per-thread arenas give back free memory too, so every step
page-faults on each 4 KiB of its temporaries again: ~36,000 faults (~150 MB) per
forward+backward of that MoE layer. Served from one arena's heap that is never
trimmed, the steady state has none, and the GPT-2 step of peer.py's speed shape
ran ~14% faster, the MoE layer ~9% (alternated processes, 8 and 14 rounds).
tests/test_host_memory.py counts the faults. The heap is never trimmed (a
threshold of 2**31 - 1, mallopt's largest int, still let glibc return a free top
over 2 GiB: peer.py's Mixtral-style step, ~1.3 GB of temporaries with a few steps
in flight, re-faulted ~1 GB per step and ran ~30% slower). The cost: the
process's resident memory stays at its peak instead of shrinking between steps.

`keep_freed_memory()` must run before JAX starts its CPU client (a thread's
arena is fixed at its first allocation): `python -m bigjax.main` and the
benchmarks call it first thing. It changes nothing where JAX will run on an
accelerator (there the host's threads, input pipeline and checkpoint writes
keep glibc's defaults) or where malloc is not glibc's.
"""
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import sys

import jax

# glibc's mallopt parameters (malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = (
    (_M_ARENA_MAX, 1),  # One arena for all threads, so that the settings below hold.
    (_M_MMAP_MAX, 0),  # Large blocks from the heap too, not mapped per allocation...
    (_M_TRIM_THRESHOLD, -1),  # ...and kept when freed (-1: never trimmed)...
    (_M_TOP_PAD, 64 << 20),  # ...the heap growing in steps of 64 MiB.
)


def keep_freed_memory() -> bool:
  """Applies SETTINGS through glibc's mallopt when JAX will run on the CPU; False
  (nothing changed) otherwise."""
  libc = glibc()
  if libc is None or not cpu_only():
    return False
  return all([libc.mallopt(param, value) == 1 for param, value in SETTINGS])


def glibc() -> ctypes.CDLL | None:
  """The C library when it is glibc and its malloc is the process's (no
  tcmalloc or jemalloc preloaded in front of it), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # Only glibc has it (musl's mallopt does nothing).
  except (OSError, AttributeError):
    return None
  address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
  return libc if address(ctypes.CDLL(None).malloc) == address(libc.malloc) else None


def cpu_only() -> bool:
  """Whether JAX will run on the CPU, told without starting it: JAX_PLATFORMS
  (jax_platforms) names cpu first, or no accelerator plugin is installed."""
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(",")[0] == "cpu"
  return not (importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))
