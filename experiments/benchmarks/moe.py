r"""MoE layer vs. a dense MLP of the same active FLOPs: time and memory, fwd+bwd.

  python experiments/benchmarks/moe.py            # ~2 minutes on 2 CPU cores
  python experiments/benchmarks/moe.py --tokens=2048,8192 --emb=512 --mlp=2048

A top-2 MoE layer (E experts of hidden size H) does the work of a dense MLP of
hidden size 2H per token (plus capacity padding); that dense MLP is the
baseline. Each configuration is compiled once, warmed up, then timed as the
median of --repeats runs, all in this one process so ratios compare like with
like. Memory is XLA's own accounting of the compiled program (temporaries +
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


def measure(module, x, repeats):
  fn, params = _fwd_bwd(module)
  rng = jax.random.PRNGKey(0)
  compiled = fn.lower(params, x, rng).compile()
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  jax.block_until_ready(compiled(params, x, rng))  # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, x, rng))
    times.append(time.perf_counter() - t)
  return statistics.median(times), peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", default="2048,8192")
  parser.add_argument("--emb", type=int, default=512)
  parser.add_argument("--mlp", type=int, default=1024, help="expert hidden size H")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--group_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  k = 2
  rows = []
  print(f"device: {jax.devices()[0].device_kind}  emb={args.emb} H={args.mlp} "
        f"E={args.experts} top-{k} group={args.group_size}")
  for tokens in map(int, args.tokens.split(",")):
    x = jax.random.normal(jax.random.PRNGKey(1), (tokens // args.group_size,
                                                  args.group_size, args.emb))
    dense = layers.MLP(_layer_config(args.emb, k * args.mlp), rngs=nnx.Rngs(0))
    base_t, base_m = measure(dense, x, args.repeats)
    rows.append((tokens, "dense MLP (hidden 2H)", base_t, base_m, 1.0))
    variants = [("einsum top-2, cf 1.0", dict(router="gshard_top2", capacity_factor=1.0)),
                ("einsum top-2, cf 1.25", dict(router="gshard_top2", capacity_factor=1.25)),
                ("dropless sorted_blocks", dict(router="dropless", top_k=2,
                                                dropless_impl="sorted_blocks")),
                ("dropless ragged_dot", dict(router="dropless", top_k=2,
                                             dropless_impl="ragged_dot"))]
    for name, kw in variants:
      cfg = moe.MoEConfig(num_experts=args.experts, group_size=args.group_size, **kw)
      layer = moe.MoEFeedForward(_layer_config(args.emb, args.mlp), cfg, rngs=nnx.Rngs(0))
      t, m = measure(layer, x, args.repeats)
      rows.append((tokens, name, t, m, t / base_t))

  print(f"\n| tokens | layer | fwd+bwd ms | memory MiB | time vs dense |")
  print("|---:|---|---:|---:|---:|")
  for tokens, name, t, m, ratio in rows:
    print(f"| {tokens} | {name} | {t * 1e3:.1f} | {m / 2**20:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
  main()
