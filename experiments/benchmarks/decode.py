r"""Decoding speed: the KV cache vs. recomputing the window at every step.

  python experiments/benchmarks/decode.py              # ~2 minutes on 2 CPU cores
  python experiments/benchmarks/decode.py --new_tokens=64,256 --batch=8 --emb=256

A decoder LM (byte vocabulary, rotary positions, float32) continues `--batch`
prompts of `--prompt_len` tokens by N tokens (greedy, no EOS, so every row
generates exactly N). `bigjax.decode.generate` keeps a [batch, kv_heads, prompt + N,
head_dim] cache per layer (lengths bucketed: bigjax/decode_batch.py) and runs one token per step;
`generate_recompute` reruns the whole [batch, prompt + N] window at every step
(the first sampler), so its cost per token grows with N. Both are one jitted
while_loop; each is run once to compile and warm up, then timed (median of
--repeats runs, round-robin), except recomputation past 256 new tokens: its one
run (tens of seconds on CPU, compilation ~1-2 s of it) is the measurement
(marked *). Both must produce the same tokens (checked).
"""
import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from bigjax import decode, host_memory
from bigjax.models import transformer


def _model(args):
  cfg = transformer.TransformerConfig(
      kind="decoder", vocab_size=384, num_layers=args.layers, emb_dim=args.emb,
      num_heads=args.heads, mlp_dim=4 * args.emb, position="rotary", init_scale=0.5)
  return transformer.build(cfg, nnx.Rngs(0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--new_tokens", default="64,256,1024")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--emb", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats}: time at least one run")
  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.

  model = _model(args)
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(3, 259, args.prompt_len))) for _ in range(args.batch)]
  print(f"{jax.devices()[0].platform} x{jax.device_count()}: decoder LM, {args.layers} layers, "
        f"emb {args.emb}, {args.heads} heads, batch {args.batch}, prompt {args.prompt_len} "
        "tokens, greedy, float32")
  header = (f"{'new tokens':>10} | {'cache tok/s':>11} | {'recompute tok/s':>15} | "
            f"{'speedup':>7} | {'cache compile+1st (s)':>21} | {'recompute compile+1st (s)':>25}")
  print(header)
  print("-" * len(header))
  for n in (int(x) for x in args.new_tokens.split(",")):
    variants = {"cache": decode.generate, "recompute": decode.generate_recompute}
    runs, first, outputs = {}, {}, {}
    times = {name: [] for name in variants}
    once = n > 256  # recomputation: one run, compilation included
    for name, fn in variants.items():
      run = (lambda fn=fn: fn(model, prompts, max_new_tokens=n, eos_id=None))
      start = time.perf_counter()
      outputs[name] = run()  # compile + warm-up
      first[name] = time.perf_counter() - start
      if name == "recompute" and once:
        times[name].append(first[name])
      else:
        runs[name] = run
    if outputs["cache"] != outputs["recompute"]:
      print(f"  (n={n}: the two differ in {sum(a != b for a, b in zip(*outputs.values()))} "
            "rows: near-tied logits)")
    for _ in range(args.repeats):
      for name, run in runs.items():
        start = time.perf_counter()
        run()  # returns host lists: the device work is finished
        times[name].append(time.perf_counter() - start)
    tps = {name: args.batch * n / statistics.median(t) for name, t in times.items()}
    mark = "*" if once else " "
    print(f"{n:>10} | {tps['cache']:>11.0f} | {tps['recompute']:>14.0f}{mark} | "
          f"{tps['cache'] / tps['recompute']:>6.1f}x | {first['cache']:>21.1f} | "
          f"{first['recompute']:>25.1f}")


if __name__ == "__main__":
  main()
