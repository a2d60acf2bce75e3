"""optax optimizers, schedules and gradient clipping from config.optim."""
import jax
import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then the named decay to `lr * end_lr_factor`."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  end = lr * optim_cfg.end_lr_factor
  decay_steps = max(total_steps - warmup, 1)
  name = optim_cfg.schedule
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr_factor)
  elif name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  elif name == "rsqrt":  # T5's inverse square root, continuous at the end of warmup.
    decay = lambda s: lr * jax.lax.rsqrt(1.0 + s / max(warmup, 1))
  else:
    raise ValueError(f"optim.schedule={name!r}; choose one of {SCHEDULES}.")
  return optax.join_schedules([warm, decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales and biases are left alone."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(optim_cfg, total_steps)
  name, wd = optim_cfg.name, optim_cfg.weight_decay
  if name == "sgd":
    opt = optax.sgd(lr)
  elif name == "momentum":
    opt = optax.sgd(lr, momentum=optim_cfg.b1)
  elif name == "nesterov":
    opt = optax.sgd(lr, momentum=optim_cfg.b1, nesterov=True)
  elif name == "adam":
    opt = optax.adam(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  elif name == "adamw":
    opt = optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=wd, mask=_decay_mask)
  elif name == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
  elif name == "lion":
    opt = optax.lion(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd,
                     mask=_decay_mask)
  else:
    raise ValueError(f"optim.name={name!r}; choose one of {OPTIMIZERS}.")
  clips = []
  if optim_cfg.clip_value:
    clips.append(optax.clip(optim_cfg.clip_value))
  if optim_cfg.clip_norm:
    clips.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  return optax.chain(*clips, opt)
