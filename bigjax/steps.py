"""Train state, its sharded creation, and the jitted train and eval steps.

The state is plain pytrees (nested dicts of arrays) so that optax, orbax and
partial restores see ordinary trees; the model graph (nnx.GraphDef) is static.
"""
import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigjax import optim, sharding
from bigjax.models import transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far.
  params: Any  # nested dict of arrays, sharded by their logical names.
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step).


@dataclasses.dataclass
class Task:
  """Everything the steps need about one model: built once per run."""
  config: Any
  mesh: Mesh
  rules: list
  graphdef: nnx.GraphDef
  rest: nnx.State  # non-parameter model state (none for the Transformers).
  tx: optax.GradientTransformation
  state_shardings: TrainState
  abstract_state: TrainState
  init_fn: Callable  # rng -> TrainState, traced inside jit by create_state.

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    spec = sharding.logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules)
    return NamedSharding(self.mesh, spec)


def model_config(config) -> transformer.TransformerConfig:
  return transformer.TransformerConfig.from_dict(config.model)


def _opt_state_shardings(abs_opt_state, abs_params, param_shardings, mesh):
  """Optimizer-state leaves that mirror a parameter (same path suffix and shape)
  take its sharding; everything else (counts, factored moments) is replicated."""
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abs_params)[0]:
    by_path[tuple(path)] = leaf.shape
  shard_by_path = {tuple(p): s for p, s in
                   jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      suffix = path[start:]
      if suffix in by_path and by_path[suffix] == getattr(leaf, "shape", None):
        return shard_by_path[suffix]
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, abs_opt_state)


def make_task(config, mesh: Mesh) -> Task:
  rules = [tuple(r) for r in config.sharding_rules]
  mcfg = model_config(config)
  abs_model = nnx.eval_shape(lambda: transformer.build(mcfg, nnx.Rngs(0)))
  graphdef, abs_params, rest = nnx.split(abs_model, nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
  tx = optim.make_optimizer(config.optim, config.total_steps)

  def init(rng):
    model = transformer.build(mcfg, nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=_opt_state_shardings(abstract.opt_state, abstract.params, param_shardings,
                                     mesh),
      rng=replicated)
  return Task(config, mesh, rules, graphdef, rest, tx, shardings, abstract, init)


def create_state(task: Task, seed: int) -> TrainState:
  """Initialises the state inside jit, so each device only ever holds its shards."""
  with sharding.use_mesh_rules(task.mesh, task.rules):
    init = jax.jit(task.init_fn, out_shardings=task.state_shardings)
    return init(jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def forward(model, batch, rng):
  """Logits for a batch, whatever the model kind."""
  if "encoder_inputs" in batch:
    return model(batch["encoder_inputs"], batch["decoder_inputs"], rng=rng)
  return model(batch["inputs"], rng=rng)


def moe_metrics(intermediates) -> dict:
  """Router metrics captured from each MoE layer, keyed 'moe/<layer path>/<name>'."""
  out = {}
  for path, var in nnx.to_flat_state(intermediates):
    if path[-1] != "router_metrics":
      continue
    layer = "/".join(str(p) for p in path[:-2])  # e.g. decoder/blocks/1
    for name, v in var.get_value()[-1].items():
      out[f"moe/{layer}/{name}"] = v
  return out


def loss_sums(model, batch, rng, router_weights=(0.0, 0.0)):
  """Summed cross-entropy, token count and correct predictions (float32), and
  for MoE models the router losses (already weighted, in per-token units)."""
  logits, intermediates = nnx.capture(forward, nnx.Intermediate)(model, batch, rng)
  targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(ce * weights), "weight_sum": jnp.sum(weights),
          "correct_sum": jnp.sum(correct * weights)}
  layers = moe_metrics(intermediates)
  if layers:
    aux = sum(v for k, v in layers.items() if k.endswith("/aux_loss"))
    z = sum(v for k, v in layers.items() if k.endswith("/z_loss"))
    # Router losses are per-token means: scaled by the token count, they keep their
    # configured weights after the step divides by the global token count.
    sums["router_loss_sum"] = sums["weight_sum"] * (router_weights[0] * aux +
                                                    router_weights[1] * z)
    sums["moe"] = layers
  return sums


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ... so each one stays
  spread evenly over the data-parallel devices."""
  def split(x):
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def router_weights(task: Task) -> tuple[float, float]:
  moe = model_config(task.config).moe
  return moe.aux_loss_weight, moe.z_loss_weight


def make_train_step(task: Task) -> Callable:
  accum = task.config.grad_accum_steps
  weights = router_weights(task)

  def sums_and_grads(params, batch, rng):
    def loss(p):
      sums = loss_sums(task.model(p), batch, rng, weights)
      return sums["loss_sum"] + sums.get("router_loss_sum", 0.0), sums
    grads, sums = jax.grad(loss, has_aux=True)(params)
    return sums, grads

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      sums, grads = sums_and_grads(state.params, batch, rng)
    else:
      def body(carry, xs):
        i, micro = xs
        micro = jax.tree.map(lambda x: sharding.constrain(
            x, ("batch",) + (None,) * (x.ndim - 1)), micro)
        sums, grads = sums_and_grads(state.params, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (sums, grads)), None
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          sums_and_grads, state.params, jax.tree.map(lambda x: x[: x.shape[0] // accum],
                                                     batch), rng))
      (sums, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum),
                                                    _microbatches(batch, accum)))
    # Gradients of the summed loss, normalised once by the global token count,
    # so accumulation over microbatches equals one big batch exactly.
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums["loss_sum"] / denom, "accuracy": sums["correct_sum"] / denom,
               "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    if "moe" in sums:  # Per-layer router metrics, averaged over microbatches.
      metrics["router_loss"] = sums["router_loss_sum"] / denom
      for k, v in sums["moe"].items():
        if k.endswith("/load"):
          metrics.update({f"{k}/expert_{e}": v[e] / accum for e in range(v.shape[0])})
        else:
          metrics[k] = v / accum
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def traced(state, batch):
    with sharding.use_mesh_rules(task.mesh, task.rules):
      return step_fn(state, batch)

  batch_shardings = jax.tree.map(lambda x: task.batch_sharding(x.ndim),
                                 _batch_spec(task))
  return jax.jit(traced, in_shardings=(task.state_shardings, batch_shardings),
                 out_shardings=(task.state_shardings, None), donate_argnums=(0,))


def make_eval_step(task: Task) -> Callable:
  def traced(params, batch):
    with sharding.use_mesh_rules(task.mesh, task.rules):
      sums = loss_sums(task.model(params), batch, None)
      return {k: sums[k] for k in ("loss_sum", "weight_sum", "correct_sum")}

  batch_shardings = jax.tree.map(lambda x: task.batch_sharding(x.ndim), _batch_spec(task))
  return jax.jit(traced, in_shardings=(task.state_shardings.params, batch_shardings))


def _batch_spec(task: Task) -> dict:
  """Batch keys and ranks the model kind consumes."""
  if task.config.model.kind == "encdec":
    keys = ("encoder_inputs", "decoder_inputs", "targets", "weights")
  else:
    keys = ("inputs", "targets", "weights")
  return {k: jax.ShapeDtypeStruct((1, 1), jnp.int32) for k in keys}


def learning_rate(task: Task, step: int) -> float:
  """The schedule's value at `step`, for logging."""
  return optim.schedule(task.config.optim, task.config.total_steps)(step)
