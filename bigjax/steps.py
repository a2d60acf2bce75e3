"""Train state, its sharded creation, and the jitted train and eval steps.

The state is plain pytrees (nested dicts of arrays) so that optax, orbax and
partial restores see ordinary trees; the model graph (nnx.GraphDef) is static.
One set of steps serves every model kind: the run's task (bigjax/tasks.py)
feeds the batch to the model and gives the loss.
"""
import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigjax import config as config_lib
from bigjax import optim, sharding, tasks
from bigjax.models import transformer, zoo


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far.
  params: Any  # nested dict of arrays, sharded by their logical names.
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step).
  # Non-parameter model state the train step updates: BatchNorm's running
  # averages (nnx.BatchStat). Empty for the Transformers.
  model_state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainSetup:
  """What the steps need for one run, built once: the config, its task, the
  mesh and rules, the model graph, the optimizer and the state's shardings."""
  config: Any
  task: tasks.Task
  mesh: Mesh
  rules: list
  graphdef: nnx.GraphDef
  rest: nnx.State  # Static model state (empty for every bigjax model).
  tx: optax.GradientTransformation
  apply_updates: Callable  # (grads, opt_state, params) -> (params, opt_state): optim.make_apply.
  state_shardings: TrainState
  abstract_state: TrainState
  init_fn: Callable  # rng -> TrainState, traced inside jit by create_state.
  param_axes: dict  # 'decoder/blocks/0/ffn/wi' -> logical axis names.

  def model(self, params, model_state=None) -> nnx.Module:
    if model_state is None:
      model_state = self.abstract_state.model_state
      if jax.tree.leaves(model_state):
        raise ValueError("This model has BatchNorm statistics: pass model_state too.")
    return nnx.merge(self.graphdef, params, model_state, self.rest)

  @property
  def loss_chunk_len(self) -> int:
    return self.task.loss_chunk_len(self.config)

  def batch_sharding(self) -> NamedSharding:
    """Rows split over the data-parallel axes; a prefix spec, so any rank >= 1."""
    return sharding.named_sharding(self.mesh, sharding.BATCH, self.rules)


def model_config(config) -> transformer.TransformerConfig:
  return transformer.TransformerConfig.from_dict(config.model)


def build_model(config, rngs: nnx.Rngs, example_shape: tuple | None = None) -> nnx.Module:
  """The model config.model describes; zoo models need one example's feature shape."""
  if config.model.kind in zoo.KINDS:
    if example_shape is None:
      raise ValueError(f"model.kind={config.model.kind!r} needs the data's example shape.")
    return zoo.build(zoo.ZooConfig.from_dict(config.model), example_shape, rngs)
  return transformer.build(model_config(config), rngs)


def make_setup(config, mesh: Mesh, example_shape: tuple | None = None) -> TrainSetup:
  """`example_shape`: one example's feature shape (zoo models on example data)."""
  rules = [tuple(r) for r in config.sharding_rules]
  build = lambda rngs: build_model(config, rngs, example_shape)
  abs_model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  graphdef, abs_params, abs_stats, rest = nnx.split(abs_model, nnx.Param, nnx.BatchStat, ...)
  check_divisible(abs_params, mesh, rules)
  check_divisible(abs_stats, mesh, rules)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
  optim.check_freeze(config.optim, nnx.to_pure_dict(abs_params))
  stacked = optim.has_stacked(nnx.to_pure_dict(abs_params))
  tx = optim.make_optimizer(config.optim, config.total_steps, stacked)

  def init(rng):
    _, params, stats, _ = nnx.split(build(nnx.Rngs(params=rng)), nnx.Param, nnx.BatchStat, ...)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng, model_state=nnx.to_pure_dict(stats))

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=optim.state_shardings(tx, abstract.opt_state, abstract.params,
                                      param_shardings, replicated),
      rng=replicated,
      model_state=nnx.to_pure_dict(sharding.state_shardings(abs_stats, mesh, rules)))
  param_axes = {"/".join(map(str, path)): sharding.logical_axes_of(v)
                for path, v in nnx.to_flat_state(abs_params)}
  return TrainSetup(config, tasks.get(config.task), mesh, rules, graphdef, rest, tx,
                    optim.make_apply(config.optim, config.total_steps, stacked), shardings,
                    abstract, init, param_axes)


def check_divisible(abs_state: nnx.State, mesh: Mesh, rules):
  """Raises ConfigError unless every dimension of every variable splits evenly
  over the mesh axes its logical name maps to. Otherwise jax would fail later,
  creating the state, with an IndivisibleError naming neither the parameter nor
  the config field; and config.validate cannot see every size (a zoo model's
  input width comes from the data)."""
  for path, v in nnx.to_flat_state(abs_state):
    names = sharding.logical_axes_of(v)
    if not names:
      continue
    shape = v.get_value().shape
    spec = sharding.logical_to_spec(names, rules, mesh.axis_names)
    for name, size, axes in zip(names, shape, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      split = math.prod(mesh.shape[a] for a in axes)
      if size % split:
        over = " × ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        field, need = ((f"mesh.{axes[0]}", f"mesh.{axes[0]} must divide {size}")
                       if len(axes) == 1 else
                       ("mesh", f"{' × '.join(f'mesh.{a}' for a in axes)} must divide {size}"))
        raise config_lib.ConfigError(
            f"config.{field}: parameter {'/'.join(map(str, path))} (shape {tuple(shape)}) "
            f"has {size} along its logical axis {name!r}, which config.sharding_rules "
            f"split over {over}; {split} does not divide {size}. Change the mesh ({need}) "
            "or that model dimension.")


def create_state(setup: TrainSetup, seed: int) -> TrainState:
  """Initialises the state inside jit, so each device only ever holds its shards."""
  with sharding.use_mesh_rules(setup.mesh, setup.rules):
    init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
    return init(jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def moe_metrics(intermediates) -> dict:
  """Router metrics captured from each MoE layer, keyed 'moe/<layer path>/<name>'."""
  out = {}
  for path, var in nnx.to_flat_state(intermediates):
    if path[-1] == "router_metrics":  # Sown by the MoE layer of decoder/blocks/1/ffn.
      by_layer = {"/".join(str(p) for p in path[:-2]): var.get_value()[-1]}
    elif path[-1] == "scanned_router_metrics":  # By a scanned stack, for its blocks.
      stack = "/".join(str(p) for p in path[:-1])
      by_layer = {f"{stack}/{block}": m for block, m in var.get_value()[-1].items()}
    else:
      continue
    for layer, metrics in by_layer.items():
      for name, v in metrics.items():
        out[f"moe/{layer}/{name}"] = v
  return out


def loss_sums(task: tasks.Task, model, batch, rng, router_weights=(0.0, 0.0),
              loss_chunk_len: int = 0, router_scale=None):
  """The task's summed loss, weight (token or example) count and correct
  predictions (float32; no correct_sum for regression), and for MoE models the
  router losses (already weighted, in per-token units: times `router_scale`, by
  default this batch's weight sum). `loss_chunk_len` > 0: the output projection
  and softmax loss in chunks of that many positions."""
  capture = nnx.capture(task.per_target_loss, nnx.Intermediate)
  (values, correct), intermediates = capture(model, batch, rng, loss_chunk_len)
  weights = batch["weights"].astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(values * weights), "weight_sum": jnp.sum(weights)}
  if correct is not None:
    sums["correct_sum"] = jnp.sum(correct.astype(jnp.float32) * weights)
  layers = moe_metrics(intermediates)
  if layers:
    aux = sum(v for k, v in layers.items() if k.endswith("/aux_loss"))
    z = sum(v for k, v in layers.items() if k.endswith("/z_loss"))
    # Router losses are means over routing groups: scaled by the token count, they
    # keep their configured weights after the step divides by the global token count.
    scale = sums["weight_sum"] if router_scale is None else router_scale
    sums["router_loss_sum"] = scale * (router_weights[0] * aux + router_weights[1] * z)
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


def router_weights(setup: TrainSetup) -> tuple[float, float]:
  if setup.config.model.kind in zoo.KINDS:
    return 0.0, 0.0
  moe = model_config(setup.config).moe
  return moe.aux_loss_weight, moe.z_loss_weight


def make_train_step(setup: TrainSetup) -> Callable:
  accum = setup.config.grad_accum_steps
  weights = router_weights(setup)

  def sums_and_grads(params, model_state, batch, rng, router_scale=None):
    def loss(p):
      model = setup.model(p, model_state)
      sums = loss_sums(setup.task, model, batch, rng, weights, setup.loss_chunk_len,
                       router_scale)
      new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return sums["loss_sum"] + sums.get("router_loss_sum", 0.0), (sums, new_model_state)
    grads, (sums, model_state) = jax.grad(loss, has_aux=True)(params)
    return sums, grads, model_state

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      sums, grads, model_state = sums_and_grads(state.params, state.model_state, batch, rng)
    else:
      # Each microbatch's router losses count by the whole batch's weight / accum,
      # not its own weight: their sum over microbatches is then the batch's
      # (router losses divide by all positions and groups, padding included, and
      # microbatches hold equal numbers of both whatever their weights).
      router_scale = jnp.sum(batch["weights"].astype(jnp.float32)) / accum

      def body(carry, xs):
        i, micro = xs
        total, model_state = carry
        micro = jax.tree.map(lambda x: sharding.constrain(
            x, sharding.BATCH + (None,) * (x.ndim - 1)), micro)
        sums, grads, model_state = sums_and_grads(state.params, model_state, micro,
                                                  jax.random.fold_in(rng, i), router_scale)
        return (jax.tree.map(jnp.add, total, (sums, grads)), model_state), None
      sums_shape, grads_shape, _ = jax.eval_shape(
          sums_and_grads, state.params, state.model_state,
          jax.tree.map(lambda x: x[: x.shape[0] // accum], batch), rng)
      zero = jax.tree.map(jnp.zeros_like, (sums_shape, grads_shape))
      ((sums, grads), model_state), _ = jax.lax.scan(
          body, (zero, state.model_state), (jnp.arange(accum), _microbatches(batch, accum)))
    # Gradients of the summed loss, normalised once by the global token count,
    # so accumulation over microbatches equals one big batch exactly (the README
    # lists what cannot: BatchNorm, random draws, the dropless balance loss).
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    # A non-finite loss can come with finite gradients (an out-of-range label: its
    # cross-entropy is NaN, its gradient not). The guard looks at the gradients, so
    # such a step's are made NaN: "skip" drops it, "halt" stops the run.
    finite = jnp.isfinite(sums["loss_sum"])
    if "router_loss_sum" in sums:
      finite &= jnp.isfinite(sums["router_loss_sum"])
    scale = jnp.where(finite, 1.0 / denom, jnp.nan)
    # XLA fuses a product; in the gradients' dtype (bfloat16 parameters' too).
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    params, opt_state = setup.apply_updates(grads, state.opt_state, state.params)
    guard = optim.guard_state(opt_state)
    if guard is not None:  # An update the guard skipped keeps the BatchNorm statistics too.
      model_state = jax.tree.map(lambda new, old: jnp.where(guard.last_finite, new, old),
                                 model_state, state.model_state)
    metrics = {"loss": sums["loss_sum"] / denom,
               "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    if "correct_sum" in sums:
      metrics["accuracy"] = sums["correct_sum"] / denom
    if "moe" in sums:  # Per-layer router metrics, averaged over microbatches.
      metrics["router_loss"] = sums["router_loss_sum"] / denom
      for k, v in sums["moe"].items():
        if k.endswith("/load"):
          metrics.update({f"{k}/expert_{e}": v[e] / accum for e in range(v.shape[0])})
        else:
          metrics[k] = v / accum
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics

  def train_step(state, batch):  # (Its name names the XLA module: jit_train_step.)
    with sharding.use_mesh_rules(setup.mesh, setup.rules):
      return step_fn(state, batch)

  return jax.jit(train_step, in_shardings=(setup.state_shardings, setup.batch_sharding()),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: TrainSetup) -> Callable:
  """(params, model_state, batch) -> summed loss, weights and correct predictions."""
  def eval_step(params, model_state, batch):
    with sharding.use_mesh_rules(setup.mesh, setup.rules):
      sums = loss_sums(setup.task, setup.model(params, model_state), batch, None,
                       loss_chunk_len=setup.loss_chunk_len)
      return {**{k: v for k, v in sums.items() if k in ("loss_sum", "weight_sum", "correct_sum")},
              **setup.task.eval_sums(batch)}

  return jax.jit(eval_step, in_shardings=(setup.state_shardings.params,
                                       setup.state_shardings.model_state,
                                       setup.batch_sharding()))
