"""The XLA:CPU flags bigjax sets change the schedule, not the results."""
import os
import subprocess
import sys

from bigjax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

# One AdamW train step of a small decoder on 1 device; prints a digest of the new
# parameters and the loss, bit for bit.
STEP = """
import hashlib, os, sys
sys.path.insert(0, {root!r})
import bigjax, jax, numpy as np
from bigjax import loop, sharding, steps
from configs import lm
print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
config = lm.get_config("runlocal")
config.mesh.update(data=1)
config.model.update(dtype="float32", num_layers=2)
setup = steps.make_setup(config, sharding.config_mesh(config))
state = steps.create_state(setup, 0)
rng = np.random.default_rng(0)
tokens = rng.integers(3, 259, (config.batch_size, config.seq_len)).astype(np.int32)
batch = loop.global_batch(setup, dict(inputs=tokens, targets=np.roll(tokens, -1, 1),
                                       weights=np.ones_like(tokens, np.float32)))
state, metrics = steps.make_train_step(setup)(state, batch)
leaves = [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state.params))]
print(float(metrics["loss"]), hashlib.sha256(b"".join(leaves)).hexdigest())
"""


def test_flags_are_added_unless_set_or_kept():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply(env) == ("--xla_force_host_platform_device_count=8 "
                                  f"{FLAG}=false")
  assert xla_flags.apply(env) == env["XLA_FLAGS"]  # Idempotent.
  mine = {"XLA_FLAGS": f"{FLAG}=true"}
  assert xla_flags.apply(mine) == f"{FLAG}=true"
  kept = {"XLA_FLAGS": "", "BIGJAX_KEEP_XLA_FLAGS": "1"}
  assert xla_flags.apply(kept) == "" and kept["XLA_FLAGS"] == ""


def _step(**env):
  out = subprocess.run([sys.executable, "-c", STEP.format(root=ROOT)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                    "XLA_FLAGS": "", **env}, check=True)
  flags, result = out.stdout.strip().splitlines()[-2:]
  return flags.removeprefix("XLA_FLAGS="), result


def test_a_train_step_is_bit_identical_with_and_without_the_flags():
  flags, with_flags = _step()
  assert f"{FLAG}=false" in flags
  flags, without = _step(BIGJAX_KEEP_XLA_FLAGS="1")
  assert FLAG not in flags
  assert with_flags == without
