r"""MoE layer vs. a dense MLP of the same active FLOPs: time and memory, fwd+bwd.

  python experiments/benchmarks/moe.py            # ~2 minutes on 2 CPU cores
  python experiments/benchmarks/moe.py --tokens=2048,8192 --emb=512 --mlp=2048

A top-2 MoE layer (E experts of hidden size H) does the work of a dense MLP of
hidden size 2H per token (plus capacity padding); that dense MLP is the
baseline. Every configuration of a token count is compiled and warmed up, then
they are timed round-robin (one run of each, --repeats times) and the median
kept, all in this one process, so that slow drifts of a shared machine hit
every variant alike and the ratios compare like with like. Memory is XLA's own accounting of the compiled program (temporaries +
arguments + outputs), which is exact and independent of the allocator.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import layers, moe


def _layer_config(emb, mlp):
  return layers.LayerConfig(emb_dim=emb, num_heads=1, num_kv_heads=1, head_dim=emb,
                            mlp_dim=mlp, mlp_activation="gelu")


def _fwd_bwd(module):
  graphdef, params = nnx.split(module, nnx.Param, ...)[:2]
  rest = nnx.split(module, nnx.Param, ...)[2]

  def loss(p, x, rng):
    m = nnx.merge(graphdef, p, rest)
    if isinstance(m, moe.MoEFeedForward):
      y = m(x, rng=rng)
    else:
      y = m(x)
    return jnp.mean(jnp.square(y))

  return jax.jit(jax.value_and_grad(loss)), params


def prepare(module, x):
  """A warmed-up zero-argument runner and the program's memory in bytes."""
  fn, params = _fwd_bwd(module)
  rng = jax.random.PRNGKey(0)
  compiled = fn.lower(params, x, rng).compile()
  mem = compiled.memory_analysis()
  total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  run = lambda: jax.block_until_ready(compiled(params, x, rng))
  run()  # warm-up
  return run, total


def time_round_robin(runners: dict, repeats: int) -> dict:
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", default="2048,8192")
  parser.add_argument("--emb", type=int, default=512)
  parser.add_argument("--mlp", type=int, default=1024, help="expert hidden size H")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--group_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  k = 2
  rows = []
  print(f"device: {jax.devices()[0].device_kind}  emb={args.emb} H={args.mlp} "
        f"E={args.experts} top-{k} group={args.group_size}")
  for tokens in map(int, args.tokens.split(",")):
    x = jax.random.normal(jax.random.PRNGKey(1), (tokens // args.group_size,
                                                  args.group_size, args.emb))
    dense = layers.MLP(_layer_config(args.emb, k * args.mlp), rngs=nnx.Rngs(0))
    runners, memory = {}, {}
    runners["dense MLP (hidden 2H)"], memory["dense MLP (hidden 2H)"] = prepare(dense, x)
    variants = [("einsum top-2, cf 1.0", dict(router="gshard_top2", capacity_factor=1.0)),
                ("einsum top-2, cf 1.25", dict(router="gshard_top2", capacity_factor=1.25)),
                ("dropless sorted_blocks", dict(router="dropless", top_k=2,
                                                dropless_impl="sorted_blocks")),
                ("dropless ragged_dot", dict(router="dropless", top_k=2,
                                             dropless_impl="ragged_dot"))]
    for name, kw in variants:
      cfg = moe.MoEConfig(num_experts=args.experts, group_size=args.group_size, **kw)
      layer = moe.MoEFeedForward(_layer_config(args.emb, args.mlp), cfg, rngs=nnx.Rngs(0))
      runners[name], memory[name] = prepare(layer, x)
    times = time_round_robin(runners, args.repeats)
    base = times["dense MLP (hidden 2H)"]
    rows += [(tokens, name, t, memory[name], t / base) for name, t in times.items()]

  print("\n| tokens | layer | fwd+bwd ms | memory MiB | time vs dense |")
  print("|---:|---|---:|---:|---:|")
  for tokens, name, t, m, ratio in rows:
    print(f"| {tokens} | {name} | {t * 1e3:.1f} | {m / 2**20:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
  main()
