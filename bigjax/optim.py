"""optax optimizers, schedules, gradient clipping and the non-finite guard from
config.optim.

`optim.nan_policy` decides what a step with a NaN/Inf gradient does (a
non-finite loss counts too: the train step makes its gradients NaN, see
steps.make_train_step):
  "skip": the update is dropped (parameters and the inner optimizer state,
          including Adam's bias-correction count, are left exactly as they
          were; the train step keeps BatchNorm statistics too) and counted in
          the optimizer state, which the loop logs as `skipped_updates`;
  "halt": the update is applied, and the loop stops the run with an error at
          the next logging (or checkpoint) step, before anything non-finite is saved.

`optim.freeze` is a regular expression over parameter paths ("decoder/blocks/0/
attn/query/kernel"): matching parameters are frozen through an optax mask. They
get no update, no optimizer state, no weight decay, and do not count in the
clipping norm. With model.scan_layers the regex is matched against each block's
own path ("decoder/blocks/3/...", see `bigjax.layer_layout`), so it freezes the
same blocks in either layout: a stacked parameter some of whose blocks match has
those rows' gradients and updates zeroed (their optimizer state stays zero).

The learning-rate schedule counts train steps, skipped ones included: it is
injected (optax.inject_hyperparams) outside the non-finite guard, so the rate
applied at step n is schedule(n) whatever was skipped before, and the state
records it (`applied_learning_rate`).
"""
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax import layer_layout
from bigjax.errors import ConfigError

NAN_POLICIES = ("skip", "halt")

# name -> the decay after warmup: (lr, end_lr_factor, decay_steps, warmup) -> schedule.
_DECAYS = {
    "cosine": lambda lr, end, steps, warmup: optax.cosine_decay_schedule(lr, steps, alpha=end),
    # T5's inverse square root, continuous at the end of warmup.
    "rsqrt": lambda lr, end, steps, warmup: (
        lambda s: lr * jax.lax.rsqrt(1.0 + s / max(warmup, 1))),
    "linear": lambda lr, end, steps, warmup: optax.linear_schedule(lr, lr * end, steps),
    "constant": lambda lr, end, steps, warmup: optax.constant_schedule(lr),
}
SCHEDULES = tuple(_DECAYS)


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then the named decay to `lr * end_lr_factor`."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  if optim_cfg.schedule not in _DECAYS:
    raise ValueError(f"optim.schedule={optim_cfg.schedule!r}; choose one of {SCHEDULES}.")
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  decay = _DECAYS[optim_cfg.schedule](lr, optim_cfg.end_lr_factor,
                                      max(total_steps - warmup, 1), warmup)
  return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only (GPT-2's and nanoGPT's
  convention): norms' scales and biases are left alone. By rank, with three
  exceptions: a stacked parameter's leading layers axis does not count, and
  attention's per-head biases ([heads, head_dim]) and T5's relative position
  biases ([buckets, heads], `relative_bias/table`) are biases although they have
  two axes."""
  def decays(path, p):
    name = path_name(path)
    return (p.ndim - layer_layout.is_stacked(name) >= 2
            and not name.rsplit("/", 1)[-1].endswith("bias")
            and "relative_bias/" not in name)
  return jax.tree_util.tree_map_with_path(decays, params)


def path_name(path) -> str:
  """'decoder/blocks/0/ffn/wi' for a jax tree path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def frozen_mask(params, freeze: str):
  """Per parameter, True where its path matches `freeze`; for a stacked parameter
  a bool per row, matched against each block's path."""
  pattern = re.compile(freeze) if freeze else None
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  sizes = layer_layout.unit_sizes(names)

  def one(path, p):
    if pattern is None:
      return False
    return layer_layout.regex_rows(pattern, path_name(path), np.shape(p), sizes)

  return jax.tree_util.tree_map_with_path(one, params)


def _zero_frozen_rows(freeze: str) -> optax.GradientTransformation:
  """Zeroes the rows of stacked parameters whose blocks `freeze` matches (whole
  parameters are frozen by the multi_transform in make_optimizer)."""

  def update(updates, state, params=None):
    del params
    def one(u, rows):
      if isinstance(rows, np.ndarray) and rows.any() and not rows.all():
        return u * jnp.asarray(~rows, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
      return u
    return jax.tree.map(one, updates, frozen_mask(updates, freeze)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_freeze(optim_cfg, params):
  """Raises ConfigError unless optim.freeze (if set) matches some parameters but not all."""
  freeze = optim_cfg.freeze
  if not freeze:
    return
  try:
    re.compile(freeze)
  except re.error as e:
    raise ConfigError(f"config.optim.freeze={freeze!r} is not a regular expression ({e}).") from None
  mask = np.concatenate([np.ravel(m) for m in jax.tree.leaves(frozen_mask(params, freeze))])
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(mask):
    raise ConfigError(f"config.optim.freeze={freeze!r} matches no parameter. Parameter paths look "
                     f"like {names[:3]}; match one or more of them.")
  if all(mask):
    raise ConfigError(f"config.optim.freeze={freeze!r} freezes every parameter, so nothing would "
                     "train. Narrow it, e.g. '^embedder/'.")


# The non-finite guard never gives up: every non-finite update is skipped (the
# int32 counter saturates at its maximum, which `>` never exceeds).
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def make_optimizer(optim_cfg, total_steps: int, stacked: bool = False,
                   known_finite: bool = False) -> optax.GradientTransformation:
  """The optimizer of config.optim. `stacked`: the parameters include stacked
  blocks ([layers, ...], model.scan_layers; `has_stacked`), which Adafactor then
  treats block by block. `known_finite`: for gradients already known to be finite
  (make_apply's common case): the same state, without the guard's check."""
  _guarded(optim_cfg, optim_cfg.lr)  # A bad name or policy raises here, not at init.
  # float32 whatever the parameters' dtype: a bfloat16 rate would be rounded.
  inject = optax.inject_hyperparams(
      lambda learning_rate: _guarded(optim_cfg, learning_rate, stacked, known_finite),
      hyperparam_dtype=jnp.float32)
  return inject(learning_rate=schedule(optim_cfg, total_steps))


def make_apply(optim_cfg, total_steps: int, stacked: bool = False):
  """apply(grads, opt_state, params) -> (params, opt_state): one optimizer step
  with its state from make_optimizer's init.

  With nan_policy "skip", optax.apply_if_finite decides inside the optimizer, in a
  lax.cond whose output updates are then added to the parameters outside it. Here
  one cond covers the whole step instead: finite gradients run the optimizer
  without the guard's check (the same state, counters as after a finite step)
  and add the updates in the same branch, which XLA fuses; other gradients run
  apply_if_finite itself, which skips them. The same results within rounding
  (the clip multiplies by max_norm / norm where optax divides by the norm). Over
  84M parameters on CPU: 83.8 instead of 118.1 ms with _clip_by_global_norm
  (experiments/benchmarks/optimizer.py)."""
  guarded = make_optimizer(optim_cfg, total_steps, stacked)

  def step(tx):
    def run(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return run

  if nan_policy(optim_cfg) != "skip":
    return step(guarded)
  finite_step = step(make_optimizer(optim_cfg, total_steps, stacked, known_finite=True))

  def apply(grads, opt_state, params):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return jax.lax.cond(finite, finite_step, step(guarded), grads, opt_state, params)
  return apply


def _known_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """apply_if_finite(inner)'s state and what its update does with finite updates,
  without checking them or branching."""
  guard = optax.apply_if_finite(inner, max_consecutive_errors=_NEVER_GIVE_UP)

  def update(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner_state, params)
    return updates, state._replace(notfinite_count=jnp.zeros_like(state.notfinite_count),
                                   last_finite=jnp.ones_like(state.last_finite),
                                   inner_state=inner_state)
  return optax.GradientTransformation(guard.init, update)


def _clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's clipping (and state), by one scalar factor: XLA
  fuses a multiplication into the optimizer's element-wise update, where optax's
  per-element division makes it write the clipped gradients out first."""
  def update(updates, state, params=None):
    factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def has_stacked(params) -> bool:
  """Whether `params` (a pure dict) hold stacked blocks (model.scan_layers)."""
  return any(layer_layout.is_stacked(path_name(path))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _per_block(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on each block of a stacked ([layers, ...]) parameter apart, as on
  the unrolled blocks: Adafactor's factored moments and parameter scale (the RMS
  of a weight) would otherwise span every layer's weights."""
  def mapped(method):
    def run(*trees):
      # optax.tree_map_params inits with a placeholder, not arrays, to find the
      # state's copies of the parameter tree: that needs no mapping.
      if not any(hasattr(x, "shape") for x in jax.tree.leaves(trees[0])):
        return method(*trees)
      return jax.vmap(method)(*trees)
    return run

  def update(updates, state, params):
    return mapped(inner.update)(updates, state, params)
  blocks = optax.GradientTransformation(mapped(inner.init), update)
  label = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "blocks" if layer_layout.is_stacked(path_name(path)) else "rest", params)
  return optax.multi_transform({"blocks": blocks, "rest": inner}, label)


def _in_param_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with its updates in their parameters' dtype, and its state. The
  float32 learning rate turns bfloat16 parameters' updates into float32; the
  non-finite guard's two branches (updates, or zeros like the gradients) must
  agree on the dtype. A no-op for float32."""
  def update(updates, state, params):
    updates, state = inner.update(updates, state, params)
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state
  return optax.GradientTransformation(inner.init, update)


def _adafactor(c, lr, stacked: bool) -> optax.GradientTransformation:
  opt = _per_block(optax.adafactor(lr)) if stacked else optax.adafactor(lr)
  if not c.weight_decay:
    return opt
  # optax.adafactor's own weight_decay_rate adds wd·p after the learning rate
  # is applied: it would remove wd of every weight each step, whatever the rate.
  # Decoupled decay as AdamW's instead, -lr·wd·p (the updates are negated already).
  return optax.chain(opt, optax.add_decayed_weights(-lr * c.weight_decay, decay_mask))


class Optimizer(NamedTuple):
  # (optim config, learning rate or schedule, stacked) -> the bare optimizer.
  make: Callable
  uses_eps: bool = False  # Reads optim.eps (Adafactor keeps optax's 1e-30; Lion has none).
  # Applies optim.weight_decay (decoupled, learning-rate-scaled); validation
  # rejects a weight_decay the others would ignore.
  decays: bool = False


OPTIMIZER_TABLE = {
    "sgd": Optimizer(lambda c, lr, stacked: optax.sgd(lr)),
    "momentum": Optimizer(lambda c, lr, stacked: optax.sgd(lr, momentum=c.b1)),
    "nesterov": Optimizer(lambda c, lr, stacked: optax.sgd(lr, momentum=c.b1, nesterov=True)),
    "adam": Optimizer(lambda c, lr, stacked: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
                      uses_eps=True),
    "adamw": Optimizer(lambda c, lr, stacked: optax.adamw(
        lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
                       uses_eps=True, decays=True),
    "adafactor": Optimizer(_adafactor, decays=True),
    "lion": Optimizer(lambda c, lr, stacked: optax.lion(
        lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask), decays=True),
}
OPTIMIZERS = tuple(OPTIMIZER_TABLE)
USES_EPS = tuple(name for name, o in OPTIMIZER_TABLE.items() if o.uses_eps)
DECAYING = tuple(name for name, o in OPTIMIZER_TABLE.items() if o.decays)


def _guarded(optim_cfg, lr, stacked=False, known_finite=False) -> optax.GradientTransformation:
  """The optimizer at learning rate `lr`, with clipping, freezing and the
  non-finite guard (see make_optimizer for `stacked` and `known_finite`)."""
  if optim_cfg.name not in OPTIMIZER_TABLE:
    raise ValueError(f"optim.name={optim_cfg.name!r}; choose one of {OPTIMIZERS}.")
  opt = OPTIMIZER_TABLE[optim_cfg.name].make(optim_cfg, lr, stacked)
  clips = []
  if optim_cfg.clip_value:
    clips.append(optax.clip(optim_cfg.clip_value))
  if optim_cfg.clip_norm:
    clips.append(_clip_by_global_norm(optim_cfg.clip_norm))
  tx = optax.chain(*clips, _in_param_dtype(opt))
  freeze = optim_cfg.freeze
  if freeze:
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda f: "frozen" if np.all(f) else "train",
                                    frozen_mask(params, freeze)))
    # Partly frozen stacked parameters: out of the clipping norm before, no update after.
    tx = optax.chain(_zero_frozen_rows(freeze), tx, _zero_frozen_rows(freeze))
  if nan_policy(optim_cfg) == "skip":
    tx = (_known_finite(tx) if known_finite else
          optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP))
  return tx


def nan_policy(optim_cfg) -> str:
  policy = optim_cfg.nan_policy
  if policy not in NAN_POLICIES:
    raise ValueError(f"optim.nan_policy={policy!r}; choose one of {NAN_POLICIES}.")
  return policy


def state_shardings(tx, abstract_opt_state, abstract_params, param_shardings, replicated):
  """Shardings of the optimizer state, derived from the parameters' by optax's
  tree_map_params: every copy of the parameter tree inside the state (Adam's mu
  and nu, momentum traces) takes the parameters' shardings leaf by leaf. Leaves of
  another shape (Adafactor's factored rows and columns) and the rest (counts) are
  replicated; masked-out entries (frozen parameters) stay masked."""
  def one(leaf, param_sharding, param):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    return param_sharding if leaf.shape == param.shape else replicated

  return optax.tree_map_params(
      tx, one, abstract_opt_state, param_shardings, abstract_params,
      transform_non_params=lambda leaf: leaf if isinstance(leaf, optax.MaskedNode)
      else replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def guard_state(opt_state) -> optax.ApplyIfFiniteState | None:
  """The non-finite guard's state (nan_policy "skip"), else None."""
  inner = opt_state.inner_state
  return inner if isinstance(inner, optax.ApplyIfFiniteState) else None


def skipped_updates(opt_state):
  """Updates skipped so far for non-finite gradients (an int32 array), or None
  when the optimizer does not skip (nan_policy "halt")."""
  guard = guard_state(opt_state)
  return None if guard is None else guard.total_notfinite


def applied_learning_rate(opt_state):
  """The learning rate of the last update (a float32 array): schedule(step)."""
  return opt_state.hyperparams["learning_rate"]
