r"""Training throughput and MFU of a ~1B dense decoder and two 8-expert MoEs on one GPU.

  python experiments/benchmarks/gpu.py                 # H200: dense + gshard ~3 min
  python experiments/benchmarks/gpu.py --models=dropless --dropless_impl=hopper
  python experiments/benchmarks/gpu.py --preset=tiny   # a CPU smoke run (seconds)
  python experiments/benchmarks/gpu.py --attention_impl=xla --models=dense
                                                    # without cuDNN's attention
  python experiments/benchmarks/gpu.py --batch=16 \
      --remat_policy=dots_with_no_batch_dims_saveable  # larger batches, recomputing
                                                    # attention scores in the backward pass
  python experiments/benchmarks/gpu.py --unrolled   # blocks not scanned (compiles longer)
  python experiments/benchmarks/gpu.py --models=gshard --capacity_dispatch=gather
                                                    # tokens to experts by gather/scatter-add
  python experiments/benchmarks/gpu.py --profile_dir=/tmp/gpu_profile
                                                    # then where each model's step time goes

All models run bigjax's own jitted train step (`python -m bigjax.main`'s) in
bfloat16 compute with float32 parameters and AdamW. The MoE models have the dense
model's attention and, in every block, 8 experts each half the size of the dense
MLP, top-2 routed (GShard capacity routing, or, with --models=...,dropless, every
token kept: dropless_impl=auto, sorted_blocks on a GPU, or --dropless_impl=hopper),
so its active FLOPs per token equal the dense
model's up to the router: the step-time ratio is the cost of routing. GShard's
dispatch and combine einsums cost 2·E·C·M FLOPs per token each, and the capacity C
grows with the routing group (2·S/E slots per expert at capacity factor 1), so
--group_size decides most of that cost: 256 tokens by default (the library's), 1024
in the H200 figures of the README (the einsums then ~25% of the experts' FLOPs);
--capacity_dispatch=gather moves the tokens by a gather and a scatter-add instead
(model.moe.capacity_dispatch). MFU = model
FLOPs per token (bigjax/flops.py) x tokens/s / the chip's dense bf16 peak
(flops.PEAK_BF16).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax import config as config_lib, flops, profile_summary, sharding, steps  # noqa: E402
from bigjax.models import attention, moe, stack  # noqa: E402
from configs import lm, lm_moe  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402

# name -> (layers, width, heads, mlp, context, batch)
PRESETS = {"1b": (20, 2048, 16, 8192, 2048, 4), "tiny": (2, 128, 4, 512, 128, 4)}


# name -> MoE router (None: the dense model).
MODELS = {"dense": None, "gshard": "gshard_top2", "dropless": "dropless"}


def make_config(router, shape, attention_impl: str = "auto", dropless_impl: str = "auto",
                remat_policy: str = "none", scan_layers: bool = True, group_size: int = 256,
                capacity_dispatch: str = "auto"):
  num_layers, width, heads, mlp, seq, batch = shape
  config = (lm_moe if router else lm).get_config()
  config.update(batch_size=batch, seq_len=seq, total_steps=1000)
  config.model.update(num_layers=num_layers, emb_dim=width, num_heads=heads, mlp_dim=mlp,
                      max_len=seq, dtype="bfloat16", dropout_rate=0.0,
                      attention_impl=attention_impl, remat_policy=remat_policy,
                      scan_layers=scan_layers)
  if router:
    # Every block's MLP becomes top-2 of 8 half-size experts: the dense MLP's FLOPs.
    # Dropless routes every token; its grouped matmul is dropless_impl's.
    config.model.update(mlp_dim=mlp // 2, moe_every=1)
    config.model.moe.update(num_experts=8, router=router, top_k=2, capacity_factor=1.0,
                            group_size=group_size, dropless_impl=dropless_impl,
                            capacity_dispatch=capacity_dispatch)
  return config


def tokens_per_second(config, steps_to_time: int, profile_dir=None) -> tuple[float, str]:
  """The median step's tokens/s; with profile_dir, then a trace of two more steps
  there, and a table of where their time went (bigjax/profile_summary.py)."""
  setup = steps.make_setup(config, sharding.config_mesh(config))
  state = steps.create_state(setup, config.seed)
  train_step = steps.make_train_step(setup)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "weights": np.ones(tokens[:, 1:].shape, np.float32)},
                         setup.batch_sharding())
  times = []
  for i in range(steps_to_time + 2):  # Two warm-up steps (compile, allocate).
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  table = ""
  if profile_dir:
    # The compiled step's HLO (from jit's cache) gives each op's kind and source.
    hlo = train_step.lower(state, batch).compile().as_text()
    jax.profiler.start_trace(profile_dir)
    for _ in range(2):
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    table = profile_summary.summarize(profile_dir, hlo, steps=2)
  return config.batch_size * config.seq_len / statistics.median(times), table


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  parser.add_argument("--steps", type=timing.at_least_one, default=10)
  parser.add_argument("--attention_impl", choices=attention.ATTENTION_IMPLS, default="auto")
  parser.add_argument("--models", default="dense,gshard",
                      help=f"comma-separated, from {sorted(MODELS)}")
  parser.add_argument("--dropless_impl", choices=moe.DROPLESS_IMPLS, default="auto")
  parser.add_argument("--batch", type=timing.at_least_one, default=None,
                      help="sequences per step (default: the preset's)")
  parser.add_argument("--remat_policy", choices=stack.REMAT_POLICIES, default="none",
                      help="model.remat_policy: what the backward pass recomputes")
  parser.add_argument("--group_size", type=timing.at_least_one, default=256,
                      help="GShard routing group (tokens); its dispatch and combine "
                           "einsums cost in proportion to it (the H200 figures: 1024)")
  parser.add_argument("--capacity_dispatch", choices=moe.CAPACITY_DISPATCHES, default="auto",
                      help="GShard's token moves: einsums (auto on a GPU) or gather")
  parser.add_argument("--unrolled", action="store_true",
                      help="model.scan_layers=False: every block compiled on its own")
  parser.add_argument("--profile_dir", default=None,
                      help="after timing, trace two steps of each model into "
                           "PROFILE_DIR/NAME and print the time of each kind of op")
  args = parser.parse_args()
  unknown = set(args.models.split(",")) - set(MODELS)
  if unknown:
    parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}")
  device = jax.devices()[0]
  peak = flops.peak_flops(device.device_kind)
  shape = PRESETS[args.preset][:5] + (args.batch or PRESETS[args.preset][5],)
  seq = shape[4]
  attention_impl = attention.attention_impl_for(steps.model_config(make_config(
      None, shape, args.attention_impl)).layer_config(), device,
      dropout=False, lengths=(seq, seq))
  print(f"{device.device_kind} x{jax.device_count()}, jax {jax.__version__}; preset "
        f"{args.preset} {shape} (layers, width, heads, mlp, context, batch); "
        f"attention: {attention_impl}; remat: {args.remat_policy}; "
        f"{'unrolled' if args.unrolled else 'scanned'} blocks; MoE groups of "
        f"{args.group_size} tokens, dispatch {args.capacity_dispatch}")
  configs = {name: make_config(MODELS[name], shape, args.attention_impl, args.dropless_impl,
                               args.remat_policy, scan_layers=not args.unrolled,
                               group_size=args.group_size,
                               capacity_dispatch=args.capacity_dispatch)
             for name in args.models.split(",")}
  for config in configs.values():  # As a run would, before any model compiles.
    try:
      config_lib.validate(config, num_devices=jax.device_count())
    except config_lib.ConfigError as e:
      parser.error(str(e))
  rates = {}
  for name, config in configs.items():
    per_token = flops.training_flops_per_token(steps.model_config(config), config.seq_len)
    params = sum(x.size for x in jax.tree.leaves(steps.make_setup(
        config, sharding.config_mesh(config)).abstract_state.params))
    rates[name], table = tokens_per_second(
        config, args.steps, args.profile_dir and os.path.join(args.profile_dir, name))
    mfu = f"MFU {rates[name] * per_token / jax.device_count() / peak:.1%}" if peak else \
        "MFU n/a (chip not in flops.PEAK_BF16)"
    print(f"  {name:9s} {params / 1e9:5.2f}B params  {rates[name]:9.0f} tokens/s  {mfu}")
    if table:
      print(f"  Step time {1e3 * config.batch_size * config.seq_len / rates[name]:.1f} ms; "
            + table.replace("\n", "\n  "))
  for name in (n for n in rates if n != "dense" and "dense" in rates):
    print(f"  {name} step / dense step: {rates['dense'] / rates[name]:.2f}x")


if __name__ == "__main__":
  main()
