"""Where each side's time goes in peer.py's speed comparison, measured in each
framework alone: the f32 matmul roofline, the GPT-2 step's matmuls as one graph,
the Mixtral-style MoE layer, and one product of the grouped FFN's largest chunk.
peer.py calls these after its step rounds (they need its bench extra)."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bigjax import steps
from experiments.benchmarks import hf_models, timing

_square = jax.jit(lambda x: x @ x)


def matmul_roofline(n=2048, repeats=5) -> float:
  """XLA's f32 matmul FLOP/s here (best of `repeats`): the practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  _square(a).block_until_ready()
  best = min(timed(lambda: _square(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def torch_matmul_roofline(n=2048, repeats=5) -> float:
  """The same measurement with torch's f32 matmul, for comparison."""
  a = torch.randn(n, n)
  torch.mm(a, a)
  return 2 * n ** 3 / min(timed(lambda: torch.mm(a, a)) for _ in range(repeats))


def matmul_graph(args, step_seconds=None):
  """The speed shape's matmuls alone, in each framework: per layer the four
  attention projections and the two MLP products over [batch*context, width],
  with residual adds and GELU between them, forward and backward (no attention
  scores, norms, loss or optimizer). Its GFLOP/s ratio is the part of the step
  ratio that the two frameworks' GEMMs decide; with `step_seconds` ({side: the
  GPT-2 step's seconds}) each step is split into these matmuls and the rest."""
  layers_, e, _, m, seq, batch = (int(x) for x in args.speed_shape.split(","))
  n = seq * batch
  # Forward + 2x backward, less the first layer's q/k/v input gradients (the
  # graph's input is not differentiated, on either side).
  flops_ = 3 * 2 * n * (4 * e * e + 2 * e * m) * layers_ - 3 * 2 * n * e * e
  shapes = [(e, e)] * 4 + [(e, m), (m, e)]
  rng = np.random.default_rng(0)
  weights = [[(rng.normal(size=s) * 0.02).astype(np.float32) for s in shapes]
             for _ in range(layers_)]
  x = rng.normal(size=(n, e)).astype(np.float32)
  # q, k and v read differently scaled inputs, as the step's read one input into
  # three different uses: with one input their weight gradients would be the same
  # product, which XLA computes once and torch three times.
  scale_k, scale_v = (rng.uniform(0.5, 1.5, size=e).astype(np.float32) for _ in range(2))

  def graph(ws, x, gelu, sk, sv):
    for q, k, v, o, wi, wo in ws:
      x = x + gelu(x @ q + (x * sk) @ k + (x * sv) @ v) @ o
      x = x + gelu(x @ wi) @ wo
    return (x * x).mean()

  xla = jax.jit(jax.grad(lambda ws, x: graph(ws, x, jax.nn.gelu, scale_k, scale_v)))
  jw, jx = jax.tree.map(jnp.asarray, weights), jnp.asarray(x)
  tw = [[torch.tensor(w, requires_grad=True) for w in ws] for ws in weights]
  tx, tk, tv = (torch.tensor(a) for a in (x, scale_k, scale_v))
  tgelu = lambda z: torch.nn.functional.gelu(z, approximate="tanh")  # noqa: E731

  def torch_run():
    for w in (w for ws in tw for w in ws):  # Fresh gradients, as jax.grad returns.
      w.grad = None
    graph(tw, tx, tgelu, tk, tv).backward()
  seconds = median_seconds({"bigjax (XLA)": lambda: jax.block_until_ready(xla(jw, jx)),
                             "pytorch": torch_run}, args.rounds)
  rate = {name: flops_ / t for name, t in seconds.items()}
  print(f"The step's matmuls alone ({layers_} layers of 4 projections {e}x{e} and MLP "
        f"{e}x{m}x{e} over {n} rows, forward+backward, median of {args.rounds} "
        "alternated runs):")
  for name, r in rate.items():
    print(f"  {name:13s} {r / 1e9:6.1f} GFLOP/s")
  print(f"  bigjax / pytorch: {rate['bigjax (XLA)'] / rate['pytorch']:.2f}x")
  if step_seconds:  # The GPT-2 step's time, split into these matmuls and the rest.
    for side, name in (("bigjax", "bigjax (XLA)"), ("pytorch", "pytorch")):
      mm = flops_ / rate[name]
      print(f"  {side:8s} step {step_seconds[side]:.3f} s = matmuls {mm:.3f} s + the rest "
            f"(attention, norms, loss, optimizer) {step_seconds[side] - mm:.3f} s")


def moe_layer(args, config, step_seconds):
  """The Mixtral-style step's MoE layer alone in each framework, forward and
  backward over one batch of activations: bigjax's MoEFeedForward (the step's
  settings) against the MoE block of the HF model the step trains (its experts
  implementation); then each step split into its MoE layers and the rest."""
  from flax import nnx
  from bigjax.models import moe as moe_lib

  model_cfg = steps.model_config(config)
  shape = (config.batch_size, config.seq_len, model_cfg.emb_dim)
  rng = np.random.default_rng(0)
  x, upstream = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  ours = moe_lib.MoEFeedForward(model_cfg.layer_config(model_cfg.num_layers), model_cfg.moe,
                                rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(ours)
  grad = jax.jit(jax.grad(lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, None) *
                                                   upstream), argnums=(0, 1)))
  hf = hf_models.build("mixtral", config)
  block = hf.model.layers[0].mlp
  tx = torch.tensor(x, requires_grad=True)
  tup = torch.tensor(upstream)

  def torch_run():
    block.zero_grad(set_to_none=True)  # Fresh gradients, as jax.grad returns.
    tx.grad = None
    out = block(tx)
    ((out[0] if isinstance(out, tuple) else out) * tup).sum().backward()

  jx = jnp.asarray(x)
  ms = median_seconds({"bigjax": lambda: jax.block_until_ready(grad(state, jx)),
                        "pytorch": torch_run}, args.rounds)
  print(f"The MoE layer alone ({shape[0] * shape[1]} tokens of width {shape[2]}, "
        f"{model_cfg.moe.num_experts} experts of {model_cfg.mlp_dim}, top-{model_cfg.moe.k}; "
        f"HF experts implementation {hf.config._experts_implementation!r}; forward+backward, "
        f"median of {args.rounds} alternated runs):")
  for name, t in ms.items():
    print(f"  {name:8s} {t * 1e3:6.0f} ms")
  print(f"  bigjax / pytorch speed: {ms['pytorch'] / ms['bigjax']:.2f}x")
  for side, t in ms.items():
    layers_ = model_cfg.num_layers * t
    print(f"  {side:8s} step {step_seconds[side]:.3f} s = MoE layers {layers_:.3f} s + the rest "
          f"{step_seconds[side] - layers_:.3f} s")
  expert_chunk_matmul(args, 16 * model_cfg.moe.block_size, model_cfg.emb_dim,
                      model_cfg.mlp_dim)


def expert_chunk_matmul(args, rows: int, width: int, hidden: int, repeats: int = 20):
  """One product of the MoE layer's largest expert chunk, [rows, width] by [width,
  hidden], `repeats` times in each framework (XLA's inside one jitted loop): the
  GEMM speed that bounds the grouped FFN, whose chunks are a segment long at most."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(rows, width)).astype(np.float32), rng.normal(
      size=(width, hidden)).astype(np.float32)
  xla = jax.jit(lambda a, b: jax.lax.fori_loop(
      0, repeats, lambda i, acc: acc + (a + i) @ b, jnp.zeros((rows, hidden))))
  ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.tensor(a), torch.tensor(b)

  def torch_run():
    for i in range(repeats):
      (ta + i) @ tb

  seconds = median_seconds({"bigjax (XLA)": lambda: jax.block_until_ready(xla(ja, jb)),
                             "pytorch": torch_run}, args.rounds)
  print(f"One expert chunk's product ({rows}x{width} by {width}x{hidden}, {repeats} in a loop, "
        f"median of {args.rounds} alternated runs):")
  for name, t in seconds.items():
    print(f"  {name:13s} {2 * rows * width * hidden * repeats / t / 1e9:6.1f} GFLOP/s")
  print(f"  bigjax / pytorch: {seconds['pytorch'] / seconds['bigjax (XLA)']:.2f}x")


def median_seconds(runs: dict, rounds: int) -> dict:
  """{name: median seconds} of each run, after one warm-up call each, the runs
  alternated for `rounds` rounds."""
  for run in runs.values():
    run()
  return timing.median_round_robin(runs, rounds)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start
