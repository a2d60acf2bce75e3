r"""MoE layer vs. a dense MLP of the same active FLOPs: time and memory, fwd+bwd.

  python experiments/benchmarks/moe.py            # ~2 minutes on 2 CPU cores
  python experiments/benchmarks/moe.py --tokens=2048,8192 --emb=512 --mlp=2048
  # + the expert-parallel dropless layer on 8 devices (fake ones on CPU):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python experiments/benchmarks/moe.py --expert_shards=8

A top-2 MoE layer (E experts of hidden size H) does the work of a dense MLP of
hidden size 2H per token (plus capacity padding); that dense MLP is the
baseline. The capacity-routed layer moves tokens to its expert slots and back
by GShard's einsums over the dense routing tensors, or by a gather and a
scatter-add (model.moe.capacity_dispatch). Every configuration of a token count is compiled and warmed up, then
they are timed round-robin (one run of each, --repeats times) and the median
kept, all in this one process, so that slow drifts of a shared machine hit
every variant alike and the ratios compare like with like. Memory is XLA's own accounting of the compiled program (temporaries +
arguments + outputs), which is exact and independent of the allocator.

With --dtype=bfloat16 on an H100/H200 the dropless layer also runs on JAX's Pallas
Mosaic GPU kernels (dropless_impl=hopper, bigjax/models/hopper_ragged_dot.py).

With --expert_shards=N the dropless layer also runs expert-parallel on a mesh of
N devices (`expert=N`, E/N experts per device, tokens split N ways; on CPU the
padded all-to-all exchange, see bigjax/models/expert_parallel.py); its memory is
per device. The other rows run on one device.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from bigjax import host_memory, sharding  # noqa: E402
from bigjax.models import expert_parallel, layers, moe  # noqa: E402
from configs import common  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402


def _layer_config(emb, mlp, dtype):
  return layers.LayerConfig(emb_dim=emb, num_heads=1, num_kv_heads=1, head_dim=emb,
                            mlp_dim=mlp, mlp_activation="gelu", dtype=dtype)


def _fwd_bwd(module, mesh=None):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rules = common.default_rules()

  def loss(p, x, rng):
    m = nnx.merge(graphdef, p, rest)
    if isinstance(m, moe.MoEFeedForward):
      y = m(x, rng=rng)
    else:
      y = m(x)
    return jnp.mean(jnp.square(y))

  def traced(p, x, rng):
    with sharding.use_mesh_rules(mesh, rules):
      return jax.value_and_grad(loss)(p, x, rng)

  if mesh is None:
    return jax.jit(jax.value_and_grad(loss)), params
  return jax.jit(traced), jax.device_put(params, sharding.state_shardings(params, mesh, rules))


def prepare(module, x, mesh=None):
  """A warmed-up zero-argument runner and the program's memory in bytes (per device)."""
  fn, params = _fwd_bwd(module, mesh)
  if mesh is not None:
    spec = sharding.logical_to_spec(("activation_batch",), common.default_rules(),
                                    mesh.axis_names)
    x = jax.device_put(x, NamedSharding(mesh, spec))
  rng = jax.random.PRNGKey(0)
  compiled = fn.lower(params, x, rng).compile()
  mem = compiled.memory_analysis()
  total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  run = lambda: jax.block_until_ready(compiled(params, x, rng))
  run()  # warm-up
  return run, total


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", default="2048,8192")
  parser.add_argument("--emb", type=int, default=512)
  parser.add_argument("--mlp", type=int, default=1024, help="expert hidden size H")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--group_size", type=timing.at_least_one, default=128)
  parser.add_argument("--repeats", type=timing.at_least_one, default=7)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="compute dtype; the 'hopper' row needs a 16-bit one")
  parser.add_argument("--expert_shards", type=int, default=0,
                      help="also run the dropless layer expert-parallel on this many devices")
  args = parser.parse_args()
  partial = [t for t in map(int, args.tokens.split(",")) if t < 1 or t % args.group_size]
  if partial:
    parser.error(f"--tokens: {partial} not a positive multiple of --group_size={args.group_size}")
  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.
  mesh = None
  if args.expert_shards:
    if len(jax.devices()) < args.expert_shards:
      raise SystemExit(f"--expert_shards={args.expert_shards} needs that many devices, found "
                       f"{len(jax.devices())}; on CPU set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={args.expert_shards}.")
    mesh = sharding.make_mesh(dict(expert=args.expert_shards),
                              jax.devices()[:args.expert_shards])
    exchange = expert_parallel.exchange_kind("auto", jax.devices()[0].platform)

  k = 2
  rows = []
  print(f"device: {jax.devices()[0].device_kind}  emb={args.emb} H={args.mlp} "
        f"E={args.experts} top-{k} group={args.group_size} dtype={args.dtype}")
  for tokens in map(int, args.tokens.split(",")):
    x = jax.random.normal(jax.random.PRNGKey(1), (tokens // args.group_size,
                                                  args.group_size, args.emb))
    dense = layers.MLP(_layer_config(args.emb, k * args.mlp, args.dtype), rngs=nnx.Rngs(0))
    runners, memory = {}, {}
    runners["dense MLP (hidden 2H)"], memory["dense MLP (hidden 2H)"] = prepare(dense, x)
    variants = [(f"{how} top-2, cf {cf}", dict(router="gshard_top2", capacity_factor=cf,
                                                capacity_dispatch=how))
                for how in ("einsum", "gather") for cf in (1.0, 1.25)]
    variants += [("dropless sorted_blocks", dict(router="dropless", top_k=2,
                                                dropless_impl="sorted_blocks")),
                ("dropless ragged_dot", dict(router="dropless", top_k=2,
                                             dropless_impl="ragged_dot"))]
    if not moe.hopper_ragged_dot.unmet_needs(layers.cuda_capability(jax.devices()[0]),
                                             args.dtype, (args.emb, args.mlp)):
      variants.append(("dropless hopper", dict(router="dropless", top_k=2,
                                               dropless_impl="hopper")))
    variants = [(name, kw, None) for name, kw in variants]
    if mesh is not None:
      variants += [(f"dropless {impl}, {args.expert_shards} expert shards ({exchange})",
                    dict(router="dropless", top_k=2, dropless_impl=impl), mesh)
                   for impl in ("sorted_blocks", "ragged_dot")]
    for name, kw, on_mesh in variants:
      cfg = moe.MoEConfig(num_experts=args.experts, group_size=args.group_size, **kw)
      layer = moe.MoEFeedForward(_layer_config(args.emb, args.mlp, args.dtype), cfg,
                                 rngs=nnx.Rngs(0))
      runners[name], memory[name] = prepare(layer, x, on_mesh)
    times = timing.median_round_robin(runners, args.repeats)
    base = times["dense MLP (hidden 2H)"]
    rows += [(tokens, name, t, memory[name], t / base) for name, t in times.items()]

  print("\n| tokens | layer | fwd+bwd ms | memory MiB | time vs dense |")
  print("|---:|---|---:|---:|---:|")
  for tokens, name, t, m, ratio in rows:
    print(f"| {tokens} | {name} | {t * 1e3:.1f} | {m / 2**20:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
  main()
