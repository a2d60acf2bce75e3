"""host_memory.keep_freed_memory: after it, a jitted step whose 96 MiB of outputs
are dropped after each call reuses the memory of the call before instead of
page-faulting on fresh pages (counted with getrusage, in fresh processes: the
setting must precede JAX's CPU client, and it is process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

from bigjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import resource, sys
    from bigjax import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    import jax, jax.numpy as jnp
    x, w = jnp.ones((16384, 256)), jnp.ones((256, 1024))
    step = jax.jit(lambda x, w: (jnp.tanh(x @ w), jnp.tanh(x[::2] @ w)))  # 64 + 32 MiB.
    faults = []
    for _ in range(8):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(x, w))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, min(faults[3:]))
""")


# A block over 2 GiB malloc'ed, written, freed, three times. (XLA's own buffers
# show it too, but the heap takes a varying number of steps and several such
# blocks to settle: too much memory for a test.)
LARGE_BLOCK_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from bigjax import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 9 << 28, []  # 2.25 GiB.
    for _ in range(3):
      block = libc.malloc(size)
      assert block, "malloc failed"
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(block, 1, size)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(block)
    print(applied, min(faults[1:]))
""")


def _faults_per_step(mode: str, probe: str = PROBE) -> tuple[bool, int]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", probe, mode], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator")
def test_kept_memory_spares_each_step_its_page_faults():
  _, default = _faults_per_step("default")
  applied, kept = _faults_per_step("keep")
  assert applied
  # glibc's default gives the outputs fresh pages each call: ~24,000 of them.
  assert default > 12000, default
  assert kept < default / 20, (kept, default)


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator")
def test_kept_memory_holds_for_blocks_over_two_gib():
  """A trim threshold of 2**31 - 1 (mallopt's int) let glibc hand a heap top over
  2 GiB back after every step: peer.py's Mixtral-style step (~1.3 GB of
  temporaries, a few steps in flight) re-faulted ~1 GB per step and ran ~30% slower."""
  _, default = _faults_per_step("default", LARGE_BLOCK_PROBE)
  applied, kept = _faults_per_step("keep", LARGE_BLOCK_PROBE)
  assert applied
  assert default > 500_000, default  # 2.25 GiB of fresh 4 KiB pages each time.
  assert kept < 1000, (kept, default)


def test_runs_on_an_accelerator_keep_the_default_allocator():
  # JAX_PLATFORMS names the platform before JAX starts; no accelerator is needed.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cuda,cpu")
  out = subprocess.run([sys.executable, "-c", "from bigjax import host_memory; "
                        "print(host_memory.keep_freed_memory(), host_memory.cpu_only())"],
                       env=env, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.split() == ["False", "False"]
