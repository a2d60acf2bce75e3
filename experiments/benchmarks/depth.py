r"""Compile time and program size against depth (scanned or unrolled blocks), and
XLA's compiled memory per remat policy.

  python experiments/benchmarks/depth.py
  python experiments/benchmarks/depth.py --depths=4,16,48 --emb=768 --mlp=3072 \
      --heads=12 --seq=1024 --batch=8 --memory_depth=12
  python experiments/benchmarks/depth.py --depths=2,4 --emb=32 --mlp=64 --seq=16 \
      --batch=2 --memory_depth=2 --configs=  # a smoke run, seconds

What is compiled is the gradient of the training loss (forward + backward) of
the configs/lm.py decoder at the given width, from abstract parameters (nothing
is allocated). "Program size" is the optimised HLO's instruction count and text
size: unrolled, it grows with depth; scanned, one repeating unit is compiled
whatever the depth. Memory is XLA's accounting of the compiled program
(compiled.memory_analysis(): temporaries, the activations kept for the backward
pass among them), exact and independent of the allocator; the remat policies
trade it against recomputation.

Last, the whole train step (gradient, clipping, AdamW, metrics) of each
full-size config named by --configs, scanned and unrolled, at its own depth,
batch and length, on a one-device mesh, from abstract state.
"""
import argparse
import importlib
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # configs/ sits beside bigjax/, outside the package.

from bigjax import host_memory, sharding, steps, tasks  # noqa: E402
from bigjax.models import stack, transformer  # noqa: E402
from configs import lm  # noqa: E402


def _model_config(args, depth: int, scan: bool, policy: str) -> transformer.TransformerConfig:
  model = lm.get_config().model
  model.update(num_layers=depth, emb_dim=args.emb, num_heads=args.heads, mlp_dim=args.mlp,
               max_len=args.seq, scan_layers=scan, remat_policy=policy, dtype=args.dtype,
               dropout_rate=args.dropout)
  return transformer.TransformerConfig.from_dict(model)


def compile_grad(cfg: transformer.TransformerConfig, batch: int, seq: int):
  """(compiled loss gradient, seconds to lower and compile)."""
  abstract = nnx.eval_shape(lambda: transformer.build(cfg, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  data = {"inputs": tokens, "targets": tokens,
          "weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}

  def loss(p, batch):
    model = nnx.merge(graphdef, p, rest)
    # With dropout, a key: the masks' random bits are compiled too.
    rng = jax.random.PRNGKey(0) if cfg.dropout_rate else None
    return steps.loss_sums(tasks.get("lm"), model, batch, rng)["loss_sum"]

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(nnx.to_pure_dict(params), data).compile()
  return compiled, time.perf_counter() - start


def compile_train_step(config) -> float:
  """Seconds to lower and compile config's train step from abstract state."""
  setup = steps.make_setup(config, sharding.make_mesh(dict(data=1), jax.devices()[:1]))
  start = time.perf_counter()
  state = jax.eval_shape(lambda: steps.create_state(setup, config.seed))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state, setup.state_shardings)
  shape = (config.batch_size, config.model.max_len)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding())
           for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                            ("weights", jnp.float32))}
  steps.make_train_step(setup).lower(state, batch).compile()
  return time.perf_counter() - start


def program_size(compiled) -> tuple[int, int]:
  """(HLO instructions, characters) of the optimised program."""
  text = compiled.as_text()
  return sum(" = " in line for line in text.splitlines()), len(text)


def mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:,.1f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="4,16,48")
  parser.add_argument("--emb", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--mlp", type=int, default=1024)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--dropout", type=float, default=0.0, help="model.dropout_rate")
  parser.add_argument("--memory_depth", type=int, default=12,
                      help="Layers of the model whose memory is shown per remat policy.")
  parser.add_argument("--policies", default=",".join(stack.REMAT_POLICIES))
  parser.add_argument("--configs", default="lm,lm_moe,gpt2",
                      help="configs/NAME.py whose full-size train step is compiled; empty: none.")
  args = parser.parse_args()
  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.
  print(f"{jax.devices()[0].device_kind}; emb={args.emb} heads={args.heads} mlp={args.mlp} "
        f"seq={args.seq} batch={args.batch} {args.dtype} dropout={args.dropout}; "
        "gradient of the loss")

  print(f"\n{'layers':>6} {'layout':>8} {'compile s':>10} {'HLO instr':>10} {'HLO chars':>11}")
  for depth in map(int, args.depths.split(",")):
    for scan in (False, True):
      compiled, seconds = compile_grad(_model_config(args, depth, scan, "none"),
                                       args.batch, args.seq)
      ops, chars = program_size(compiled)
      print(f"{depth:>6} {'scanned' if scan else 'unrolled':>8} {seconds:>10.1f} {ops:>10,} "
            f"{chars:>11,}", flush=True)

  print(f"\n{args.memory_depth} scanned layers; XLA's compiled memory (MiB):")
  print(f"{'remat_policy':>32} {'temporaries':>12} {'total':>10} {'host':>8}")
  for policy in args.policies.split(","):
    try:
      compiled, _ = compile_grad(_model_config(args, args.memory_depth, True, policy),
                                 args.batch, args.seq)
    except ValueError as e:  # A policy the backend cannot run (host offload).
      print(f"{policy:>32} {e}")
      continue
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    host = getattr(mem, "host_temp_size_in_bytes", 0)
    print(f"{policy:>32} {mib(mem.temp_size_in_bytes):>12} {mib(total):>10} {mib(host):>8}",
          flush=True)

  if args.configs:
    print(f"\n{'config':>24} {'layers':>6} {'batch x len':>12} {'scanned s':>10} "
          f"{'unrolled s':>11}")
  for name in filter(None, args.configs.split(",")):
    seconds = {}
    for scan in (True, False):
      config = importlib.import_module(f"configs.{name}").get_config()
      config.model.scan_layers = scan
      seconds[scan] = compile_train_step(config)
    print(f"{f'configs/{name}.py':>24} {config.model.num_layers:>6} "
          f"{f'{config.batch_size} x {config.model.max_len}':>12} {seconds[True]:>10.1f} "
          f"{seconds[False]:>11.1f}", flush=True)


if __name__ == "__main__":
  main()
