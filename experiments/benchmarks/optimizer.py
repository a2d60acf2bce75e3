r"""The optimizer step alone: bigjax's (optim.make_apply) against the same recipe
built from optax's parts as optax documents them, timed round-robin in one process.

  python experiments/benchmarks/optimizer.py                 # ~1 minute on 2 CPU cores
  python experiments/benchmarks/optimizer.py --params_m=1 --repeats=2   # smoke size

Both: AdamW with weight decay on matrices, clipping by global norm 1.0, the
non-finite guard that skips a step (nan_policy "skip"), then the parameters
updated; jitted with the state and parameters donated, over --params_m million
float32 parameters shaped like the Mixtral-style model of peer.py (8 experts'
[8, 512, 1024] matrices). optax's recipe: inject_hyperparams(apply_if_finite(
chain(clip_by_global_norm, adamw))) and optax.apply_updates after it. bigjax's: one
cond around the whole step and clipping by a scalar factor (bigjax/optim.py).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bigjax import host_memory, optim  # noqa: E402
from configs import lm  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params_m", type=float, default=82.0,
                      help="million parameters, rounded to whole [8, 512, 1024] matrices")
  parser.add_argument("--repeats", type=timing.at_least_one, default=15)
  args = parser.parse_args()
  host_memory.keep_freed_memory()  # Before JAX starts its CPU client: see host_memory.py.
  cfg = lm.get_config().optim
  cfg.update(name="adamw", clip_norm=1.0, weight_decay=0.1, nan_policy="skip")
  per_matrix = 8 * 512 * 1024
  count = max(1, round(args.params_m * 1e6 / per_matrix))
  params = {f"w{i}": jnp.full((8, 512, 1024), 0.01) for i in range(count)}
  params.update({f"norm{i}": jnp.ones(512) for i in range(count)})
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  def optax_recipe(learning_rate):
    return optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=optim.decay_mask)), 2**31 - 1)
  reference = optax.inject_hyperparams(optax_recipe)(learning_rate=optim.schedule(cfg, 1000))

  def optax_step(grads, opt_state, params):
    updates, opt_state = reference.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  runs = {}
  for name, step, tx in (("optax parts", optax_step, reference),
                         ("bigjax optim.make_apply", optim.make_apply(cfg, 1000),
                          optim.make_optimizer(cfg, 1000))):
    # Outputs in the donated inputs' order, so XLA updates the buffers in place.
    fn = jax.jit(lambda g, s, p, step=step: step(g, s, p)[::-1], donate_argnums=(1, 2))
    state = [tx.init(params), jax.tree.map(jnp.copy, params)]

    def run(fn=fn, state=state):
      state[:] = fn(grads, *state)
      jax.block_until_ready(state)
    run()
    runs[name] = run
  median = timing.median_round_robin(runs, args.repeats)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"Optimizer step over {n / 1e6:.1f}M float32 parameters on "
        f"{jax.devices()[0].device_kind}, median of {args.repeats} round-robin runs:")
  for name, t in median.items():
    print(f"  {name:24s} {t * 1e3:7.1f} ms")
  print(f"  bigjax / optax speed: {median['optax parts'] / median['bigjax optim.make_apply']:.2f}x")


if __name__ == "__main__":
  main()
