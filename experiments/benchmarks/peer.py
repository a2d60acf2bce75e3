r"""bigjax against the same GPT-2 in PyTorch (HF transformers), side by side.

  pip install -e '.[bench]'                       # torch + transformers, benchmark only
  python experiments/benchmarks/peer.py           # everything, ~20 minutes on 2 CPU cores
  python experiments/benchmarks/peer.py --part=quality --steps=300   # the test's recipe

Equivalence, before each part: a freshly initialised bigjax model's weights
copied into the HF model of the same architecture (experiments/benchmarks/
hf_models.py: GPT-2, and Mixtral for the MoE) give the same logits (max |difference|
printed): the two sides compute the same function.

Quality: nanoGPT's baby GPT recipe (`configs/gpt2.py:baby`) trained in each
framework from its own initialisation on the same batches of the embedded corpus
(bigjax's step-indexed pipeline feeds both), with the same schedule (HF's own
scheduler on the PyTorch side), AdamW
(weight decay on matrices only), clipping and tied embeddings, evaluated on the
same validation windows. Prints validation bits per byte of each at equal steps,
and at equal wall time: at the faster side's total training time, each side's
last evaluation reached by then (evaluation time excluded). Then the peer once
more from bigjax's seed-0 initial weights: the training alone compared, without
the two frameworks' random streams (their curves should agree to float noise).

Speed: a GPT-2-style decoder at --speed_shape (default 6 layers, width 512, 8
heads, MLP 2048, context 256, batch 8, f32, no dropout), bigjax's own jitted
train step (the one `python -m bigjax.main` runs) against a PyTorch training
step of HF's GPT2LMHeadModel, timed alternately in rounds in this one process.
Then the same for an 8-expert top-2 MoE in every block against HF's Mixtral
(RMSNorm, rotary, SwiGLU experts of half the MLP width, bigjax's dropless
router with its CPU path, sorted_blocks; HF runs its experts through the
implementation transformers picks, printed: `grouped_mm` here, torch's grouped
matmul), and the MoE layer alone in each (forward and backward), splitting each
side's MoE step into its MoE layers and the rest, and one product of the size of
the grouped FFN's largest chunk in each (those parts: peer_breakdown.py).
Like `python -m bigjax.main`, the process keeps the memory it frees for reuse
(bigjax/host_memory.py), PyTorch's side as well, since they share the process.
Prints both tokens/s, their ratio, and both MFUs against the XLA f32 matmul
roofline measured in every round beside the steps (model FLOPs per token from
bigjax/flops.py: MaxText's convention, 6 x matmul parameters incl. the
unembedding + causal attention).
Last, the speed shape's matmuls alone (projections and MLP products, forward
and backward) in each framework, and each side's GPT-2 step split into those
matmuls and the rest: how much of the ratio the GEMMs decide.
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
try:
  import torch
  import transformers
except ImportError:
  sys.exit("peer.py needs the benchmark extra: pip install -e '.[bench]'")

from experiments.benchmarks import hf_models  # noqa: E402  (the bench extra: torch, transformers)
from experiments.benchmarks import peer_breakdown, timing  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bigjax import config as config_lib  # noqa: E402
from bigjax import flops, host_memory, loop, sharding, steps, tasks  # noqa: E402
from bigjax.data import pipeline  # noqa: E402
from configs import gpt2  # noqa: E402


# --------------------------------------------------------------------------
# The two sides: one object each with step(batch) and eval_loss(batches).
# --------------------------------------------------------------------------


class BigjaxSide:
  name = "bigjax"

  def __init__(self, config, init_seed=None):
    # As `python -m bigjax.main` does: a clear error for, e.g., a batch that the
    # devices (XLA_FLAGS may fake several on CPU) do not divide.
    config_lib.validate(config, num_devices=jax.device_count())
    self.setup = steps.make_setup(config, sharding.config_mesh(config))
    self.train_step = steps.make_train_step(self.setup)
    self.eval_step = steps.make_eval_step(self.setup)
    self.init_seed = config.seed if init_seed is None else init_seed
    self.reset()

  def reset(self):
    """A fresh initialisation (the compiled steps are kept)."""
    self.state = steps.create_state(self.setup, self.init_seed)

  def step(self, batch):
    self.state, metrics = self.train_step(self.state, loop.global_batch(self.setup, batch))
    return metrics

  def sync(self, metrics):
    return float(jax.device_get(metrics["loss"]))

  def eval_loss(self, batches) -> float:
    return loop.evaluate(self.setup, self.eval_step, self.state, batches)["eval_loss"]


def equivalence(arch: str, config, batch):
  bj = BigjaxSide(config)
  ours = np.asarray(bj.setup.model(bj.state.params)(jnp.asarray(batch["inputs"])))
  hf = hf_models.load(arch, jax.device_get(bj.state.params), hf_models.build(arch, config))
  with torch.no_grad():
    theirs = hf.eval()(input_ids=torch.from_numpy(np.asarray(batch["inputs"], np.int64)))
  diff = np.abs(ours - theirs.logits.numpy()).max()
  print(f"Equivalence ({arch}): the same weights in bigjax and in HF: max |logit "
        f"difference| {diff:.2e} (logit std {ours.std():.3f})")


class TorchSide:
  """The HF model of `arch` with the config's shape and bigjax's optimizer settings,
  from HF's own initialisation."""
  name = "pytorch"

  def __init__(self, config, init_seed=None, arch="gpt2", weights=None):
    """`weights`: bigjax parameters to start from instead of HF's initialisation."""
    self.config, self.arch, self.weights = config, arch, weights
    self.init_seed = config.seed if init_seed is None else init_seed
    if weights is not None:
      self.name = "pytorch from bigjax's initial weights"
    self.reset()

  def reset(self):
    config = self.config
    o = config.optim
    torch.manual_seed(self.init_seed)
    self.model = hf_models.build(self.arch, config)
    if self.weights is not None:
      self.model = hf_models.load(self.arch, self.weights, self.model)
    self.model.train()
    params = [p for p in self.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.schedule = hf_models.lr_scheduler(self.opt, o, config.total_steps)
    self.clip = o.clip_norm

  def _loss(self, batch):
    inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
    targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
    logits = self.model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="sum"), targets.numel()

  def step(self, batch):
    loss, n = self._loss(batch)
    self.opt.zero_grad(set_to_none=True)
    (loss / n).backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.schedule.step()
    return loss.detach() / n

  def sync(self, metrics):
    return float(metrics)

  def eval_loss(self, batches) -> float:
    self.model.eval()
    with torch.no_grad():
      sums = [self._loss(b) for b in batches]
    self.model.train()
    return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)


# --------------------------------------------------------------------------
# Quality: equal steps and equal wall time.
# --------------------------------------------------------------------------


def load_batches(config):
  train_tokens = pipeline.token_array("stdlib_py", "train")
  eval_tokens = pipeline.token_array("stdlib_py", "validation")
  kw = dict(global_batch_size=config.batch_size, seq_len=config.seq_len,
            examples=tasks.next_token_examples())
  return (pipeline.LMBatches(train_tokens, seed=config.seed, **kw),
          pipeline.eval_batches(eval_tokens, num_batches=config.eval_batches, **kw))


def bits_per_byte(side, evals) -> float:
  """Validation bits per byte of text, as bigjax's eval reports it (tasks.py): the
  loss summed over every target, EOS included, divided by the bytes graded."""
  task = tasks.get("lm")  # Its eval_sums count the bytes graded, as bigjax's eval does.
  tokens = sum(float(b["weights"].sum()) for b in evals)
  text = sum(float(task.eval_sums(b)["byte_sum"]) for b in evals)
  return side.eval_loss(evals) * tokens / text / math.log(2)


def train_curve(side, config, data, evals, eval_every):
  """[(step, seconds of training so far, validation bits per byte)]."""
  curve, seconds = [(0, 0.0, bits_per_byte(side, evals))], 0.0
  side.sync(side.step(data.batch(0)))  # Compile / warm up outside the clock...
  side.reset()  # ...then start again from a fresh initialisation.
  for step in range(config.total_steps):
    start = time.perf_counter()
    metrics = side.step(data.batch(step))
    if (step + 1) % eval_every == 0 or step + 1 == config.total_steps:
      side.sync(metrics)
      seconds += time.perf_counter() - start
      curve.append((step + 1, seconds, bits_per_byte(side, evals)))
      print(f"  {side.name} step {step + 1:5d}  {seconds:7.1f} s  "
            f"val {curve[-1][2]:.4f} bits/byte", flush=True)
    else:
      seconds += time.perf_counter() - start
  return curve


def at_time(curve, seconds):
  """(step reached, bits per byte) after `seconds` of training: linear between the
  evaluations on either side of it (the curve's points are (step, seconds, bits)).
  The last evaluation before it would compare the slower side at an earlier time."""
  for (s0, t0, b0), (s1, t1, b1) in zip(curve, curve[1:]):
    if t0 <= seconds <= t1:
      f = (seconds - t0) / (t1 - t0) if t1 > t0 else 1.0
      return s0 + f * (s1 - s0), b0 + f * (b1 - b0)
  return curve[-1][0], curve[-1][2]


def quality(args):
  config = gpt2.get_config("baby")
  if args.steps:
    config.total_steps = args.steps
  data, evals = load_batches(config)
  equivalence("gpt2", config, evals[0])
  print(f"Quality: configs/gpt2.py:baby, {config.total_steps} steps, "
        f"{len(evals)} validation batches of {config.batch_size}x{config.seq_len} bytes")
  # The same batches for every seed: only the initialisation changes.
  runs = {"bigjax": [], "pytorch": []}
  for seed in range(args.seeds):
    for side in (BigjaxSide, TorchSide):
      print(f" initialisation seed {seed}:", flush=True)
      runs[side.name].append(train_curve(side(config, seed), config, data, evals,
                                         args.eval_every))
  # The training alone: the peer from bigjax's seed-0 weights, so that the only
  # difference left is the framework (each side's random stream is not).
  print(" seed 0, pytorch from bigjax's initial weights:", flush=True)
  weights = jax.device_get(BigjaxSide(config, 0).state.params)
  same = train_curve(TorchSide(config, 0, weights=weights), config, data, evals,
                     args.eval_every)
  gap = max(abs(a[2] - b[2]) for a, b in zip(runs["bigjax"][0], same))
  print(f"the same initial weights: bigjax {runs['bigjax'][0][-1][2]:.4f}, pytorch "
        f"{same[-1][2]:.4f} bits/byte at step {config.total_steps}; largest difference "
        f"along the curve {gap:.4f}")
  (_, tj, bj), (_, tt, bt) = runs["bigjax"][0][-1], runs["pytorch"][0][-1]
  wall = min(tj, tt)
  (sj, wj), (st, wt) = at_time(runs["bigjax"][0], wall), at_time(runs["pytorch"][0], wall)
  print(f"equal steps ({config.total_steps}), seed 0: bigjax {bj:.4f}, pytorch {bt:.4f} "
        f"bits/byte ({bj - bt:+.4f}); training time bigjax {tj:.1f} s, pytorch {tt:.1f} s")
  print(f"equal wall time ({wall:.1f} s), seed 0: bigjax {wj:.4f} (step {sj:.0f}), "
        f"pytorch {wt:.4f} (step {st:.0f}) bits/byte (the slower side's figures "
        "interpolated between its evaluations)")
  if args.seeds > 1:
    final = {name: [c[-1][2] for c in curves] for name, curves in runs.items()}
    for name, values in final.items():
      print(f"equal steps over {args.seeds} seeds: {name:8s} mean {statistics.mean(values):.4f}"
            f" std {statistics.stdev(values):.4f}  ({', '.join(f'{v:.4f}' for v in values)})")


# --------------------------------------------------------------------------
# Speed: alternated rounds, tokens/s and MFU against the matmul roofline.
# --------------------------------------------------------------------------


def speed_config(shape: str):
  layers_, width, heads, mlp, seq, batch = (int(x) for x in shape.split(","))
  config = gpt2.get_config()
  config.update(batch_size=batch, seq_len=seq, total_steps=10_000)
  # Unrolled blocks: a scanned stack saves compile time at depth, but at 6 layers on
  # CPU its step is ~12% slower (stacked gradients are written slice by slice).
  config.model.update(num_layers=layers_, emb_dim=width, num_heads=heads, mlp_dim=mlp,
                      max_len=seq, dropout_rate=0.0, dtype="float32", scan_layers=False)
  return config


# The speed comparison's architectures (hf_models maps more, for the equivalence tests).
SPEED_ARCHS = ("gpt2", "mixtral")


def speed(args, arch: str):
  if arch not in SPEED_ARCHS:
    raise SystemExit(f"--archs: {arch!r} is not one of {SPEED_ARCHS}.")
  config = speed_config(args.speed_shape)
  if arch == "mixtral":
    config = hf_models.mixtral_like(config)
    config.model.mlp_dim //= 2  # Top-2 of half-size SwiGLU experts: 1.5x the GELU MLP's FLOPs.
  data, evals = load_batches(config)
  equivalence(arch, config, evals[0])
  sides = [BigjaxSide(config), TorchSide(config, arch=arch)]
  batches = [data.batch(i) for i in range(args.steps_per_round)]
  for side in sides:  # Compile and warm up.
    side.sync(side.step(batches[0]))
  # The roofline is measured in every round too, beside the steps: a 2-vCPU VM's
  # speed drifts over minutes (GPT-2's MFU printed 58.7-67.3% in three runs on one
  # machine when it was measured once, after the rounds); each round's MFU is its
  # own steps' FLOP/s over its own roofline.
  times, peaks = {side.name: [] for side in sides}, []
  for i in range(args.rounds):
    for side in timing.round_order(sides, i):  # As timing.median_round_robin.
      start = time.perf_counter()
      for b in batches:
        metrics = side.step(b)
      side.sync(metrics)
      times[side.name].append((time.perf_counter() - start) / len(batches))
    peaks.append(peer_breakdown.matmul_roofline(repeats=3))
  per_token = flops.training_flops_per_token(steps.model_config(config), config.seq_len)
  tokens = config.batch_size * config.seq_len
  print(f"Speed ({arch}): {args.speed_shape} (layers, width, heads, mlp, context, batch), "
        f"f32{', 8 experts of mlp/2, top-2, in every block' if arch == 'mixtral' else ''}; "
        f"median of {args.rounds} alternated rounds of {args.steps_per_round} steps; "
        f"XLA f32 matmul roofline {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s over "
        f"the rounds (torch's: {peer_breakdown.torch_matmul_roofline() / 1e9:.0f}); MFU: the "
        "median over the rounds of each round's model FLOP/s over its roofline")
  rate = {}
  for name, ts in times.items():
    rate[name] = tokens / statistics.median(ts)
    mfu = statistics.median(tokens * per_token / t / peak for t, peak in zip(ts, peaks))
    print(f"  {name:8s} {rate[name]:7.0f} tokens/s   MFU {mfu:5.1%}")
  print(f"  bigjax / pytorch: {rate['bigjax'] / rate['pytorch']:.2f}x")
  step_seconds = {name: tokens / r for name, r in rate.items()}
  if arch == "mixtral":
    peer_breakdown.moe_layer(args, config, step_seconds)
  return step_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("quality", "speed", "both"), default="both")
  parser.add_argument("--steps", type=int, default=0, help="Quality steps (0: the recipe's).")
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--seeds", type=int, default=1,
                      help="Quality: initialisation seeds per side (the same batches).")
  parser.add_argument("--speed_shape", default="6,512,8,2048,256,8")
  parser.add_argument("--archs", default="gpt2,mixtral", help="Speed: of " + str(SPEED_ARCHS))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=5)
  args = parser.parse_args()
  unknown = set(args.archs.split(",")) - set(SPEED_ARCHS)
  if unknown:
    parser.error(f"--archs: {sorted(unknown)} not among {SPEED_ARCHS}")
  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.
  torch.set_num_threads(os.cpu_count())
  print(f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores")
  if args.part in ("speed", "both"):
    step_seconds = {arch: speed(args, arch) for arch in args.archs.split(",")}
    peer_breakdown.matmul_graph(args, step_seconds.get("gpt2"))
  if args.part in ("quality", "both"):
    quality(args)


if __name__ == "__main__":
  main()
