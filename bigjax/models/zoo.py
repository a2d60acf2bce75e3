"""The classic small models every tutorial starts from: MLP, CNN, linear regression.

They follow the Transformers' conventions, so the same steps, sharding rules and
checkpoints serve them: every parameter carries logical axis names, and
`model(inputs, rng=None)` is evaluation (no dropout; BatchNorm normalises with
its running averages), while `model(inputs, rng=key)` is training (dropout draws
from the key; BatchNorm normalises by the batch and updates its running averages,
which live in nnx.BatchStat variables, not parameters).

Outputs are float32 [batch, num_outputs]: class logits, one logit for binary
classification, or the regression prediction.
"""
import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from bigjax.errors import ConfigError
from bigjax.models import dataclass_from_config, layers

KINDS = ("mlp", "cnn", "linear")
INITS = ("lecun", "xavier", "he", "zeros")
_INITS = {"lecun": nnx.initializers.lecun_normal, "xavier": nnx.initializers.xavier_uniform,
          "he": nnx.initializers.he_normal, "zeros": lambda: nnx.initializers.zeros_init()}


@dataclasses.dataclass(frozen=True)
class ZooConfig:
  """A zoo model's settings. The field defaults are configs/common.py's zoo_model
  (tested equal), for direct use; a run takes every value from its config."""
  kind: str = "mlp"
  num_outputs: int = 10  # Classes; 1 for a binary logit or a regression target.
  hidden_dims: tuple = (128,)  # mlp: hidden widths; cnn: dense widths after the convs.
  conv_features: tuple = ()  # cnn: channels of each 3x3 conv, each then 2x2 pooled.
  activation: str = "relu"
  batch_norm: bool = False  # After every hidden layer, before the activation.
  dropout_rate: float = 0.0  # After every hidden activation.
  init: str = "he"  # Hidden layers: lecun | xavier | he | zeros. The head starts at 0.
  dtype: str = "float32"
  param_dtype: str = "float32"

  @classmethod
  def from_dict(cls, d) -> "ZooConfig":
    """From config.model: every setting given, no unknown ones (a clear error)."""
    d = dict(d)
    widths = {k: tuple(d[k]) for k in ("hidden_dims", "conv_features") if k in d}
    return dataclass_from_config(cls, "model", d, **widths)


def _batch_norm(cfg: ZooConfig, features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Statistics (nnx.BatchStat) are averaged over the global batch: under jit the
  # mean of a batch-sharded array is the mean over all devices' rows. The variance
  # is the mean of squared deviations, as torch's: flax's fast E[x^2] - E[x]^2
  # cancels in float32 for inputs far from zero (off by 1e3 at a mean of 3e3).
  # Running variances are biased (batch) variances, as flax's and Keras's; torch
  # keeps unbiased ones (x n/(n-1)).
  return nnx.BatchNorm(features, momentum=0.9, use_fast_variance=False, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype,
                       rngs=rngs, scale_metadata={"out_sharding": ("mlp",)},
                       bias_metadata={"out_sharding": ("mlp",)})


class _Hidden(nnx.Module):
  """Dense -> (BatchNorm) -> activation -> (dropout)."""

  def __init__(self, cfg: ZooConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dense = nnx.Linear(d_in, d_out, use_bias=not cfg.batch_norm,
                            kernel_init=_INITS[cfg.init](), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs,
                            kernel_metadata={"out_sharding": ("embed", "mlp")},
                            bias_metadata={"out_sharding": ("mlp",)})
    self.norm = _batch_norm(cfg, d_out, rngs) if cfg.batch_norm else None

  def __call__(self, x, rng):
    x = self.dense(x)
    if self.norm is not None:
      x = self.norm(x, use_running_average=rng is None)
    return layers.dropout(layers.ACTIVATIONS[self.cfg.activation](x),
                          self.cfg.dropout_rate, rng)


class _Head(nnx.Module):
  """The output layer starts at zero (as big_vision's heads): the first prediction
  is uniform (loss ln(classes)) whatever the scale of the features below it;
  `cfg.init` draws the hidden layers."""

  def __init__(self, cfg: ZooConfig, d_in: int, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(d_in, cfg.num_outputs, kernel_init=nnx.initializers.zeros_init(),
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                            kernel_metadata={"out_sharding": ("mlp", "classes")},
                            bias_metadata={"out_sharding": ("classes",)})

  def __call__(self, x):
    return self.dense(x).astype(jnp.float32)


class MLP(nnx.Module):
  """Flattens the input features, then hidden layers and a linear head."""

  def __init__(self, cfg: ZooConfig, input_shape: tuple, *, rngs: nnx.Rngs):
    dims = [math.prod(input_shape)] + list(cfg.hidden_dims)
    self.hidden = nnx.List([_Hidden(cfg, a, b, rngs=rngs) for a, b in zip(dims, dims[1:])])
    self.head = _Head(cfg, dims[-1], rngs=rngs)

  def __call__(self, x, rng=None):
    x = x.reshape(x.shape[0], -1)
    for layer, r in zip(self.hidden, layers.split_rng(rng, len(self.hidden))):
      x = layer(x, r)
    return self.head(x)


class CNN(nnx.Module):
  """[3x3 conv -> (BatchNorm) -> activation -> 2x2 max pool] per conv_features
  entry, then the MLP's hidden layers and head. Inputs are [batch, H, W, C]."""

  def __init__(self, cfg: ZooConfig, input_shape: tuple, *, rngs: nnx.Rngs):
    # ConfigErrors: found once the data's shape is known, they are still the config's.
    if len(input_shape) != 3:
      raise ConfigError(f"config.model.kind: 'cnn' needs images [H, W, C]; the data's features "
                        f"have shape {tuple(input_shape)}. Use model.kind='mlp' for flat "
                        "features.")
    self.cfg = cfg
    h, w, c = input_shape
    if min(h, w) >> len(cfg.conv_features) == 0:  # Each stage's pooling halves the image.
      raise ConfigError(
          f"config.model.conv_features: {len(cfg.conv_features)} conv stages halve the "
          f"{h}x{w} images to nothing. Use at most {min(h, w).bit_length() - 1} stages.")
    self.convs, self.norms = nnx.List(), nnx.List()
    for features in cfg.conv_features:
      self.convs.append(nnx.Conv(c, features, (3, 3), padding="SAME",
                                 use_bias=not cfg.batch_norm, kernel_init=_INITS[cfg.init](),
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                 kernel_metadata={"out_sharding": (None, None, None, "mlp")},
                                 bias_metadata={"out_sharding": ("mlp",)}))
      self.norms.append(_batch_norm(cfg, features, rngs) if cfg.batch_norm else None)
      c, h, w = features, h // 2, w // 2
    self.mlp = MLP(cfg, (h, w, c), rngs=rngs)

  def __call__(self, x, rng=None):
    for conv, norm in zip(self.convs, self.norms):
      x = conv(x)
      if norm is not None:
        x = norm(x, use_running_average=rng is None)
      x = nnx.max_pool(layers.ACTIVATIONS[self.cfg.activation](x), (2, 2), (2, 2))
    return self.mlp(x, rng)


class LinearRegression(nnx.Module):
  """y = x @ kernel + bias: the model whose least-squares optimum is closed-form."""

  def __init__(self, cfg: ZooConfig, input_shape: tuple, *, rngs: nnx.Rngs):
    self.head = _Head(cfg, math.prod(input_shape), rngs=rngs)

  def __call__(self, x, rng=None):
    del rng  # Nothing random.
    return self.head(x.reshape(x.shape[0], -1))


def build(cfg: ZooConfig, input_shape: tuple, rngs: nnx.Rngs) -> nnx.Module:
  """The model for `cfg.kind`; `input_shape` is one example's feature shape."""
  cls = {"mlp": MLP, "cnn": CNN, "linear": LinearRegression}.get(cfg.kind)
  if cls is None:
    raise ConfigError(f"config.model.kind: {cfg.kind!r} is not a zoo model; choose one of "
                      f"{KINDS}.")
  return cls(cfg, tuple(input_shape), rngs=rngs)
