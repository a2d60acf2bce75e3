"""Per-target losses shared by the tasks: softmax cross-entropy over integer
targets (optionally in chunks of the length), sigmoid cross-entropy of one
logit, squared error."""
import jax
import jax.numpy as jnp
import optax

def _softmax(outputs, targets):
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
  return ce, jnp.argmax(outputs, -1) == targets


def _sigmoid(outputs, targets):
  value, targets = outputs[..., 0], targets.astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(value, targets), (value > 0) == (targets > 0.5)


def _mse(outputs, targets):
  return jnp.square(outputs[..., 0] - targets.astype(jnp.float32)), None


# name -> (outputs, targets) -> (loss, correct-or-None) per target.
_LOSS_FNS = {"softmax": _softmax, "sigmoid": _sigmoid, "mse": _mse}
LOSSES = tuple(_LOSS_FNS)


def pointwise_loss(loss: str, outputs, targets):
  """(loss, correct-or-None) per target: softmax cross-entropy over integer
  targets, sigmoid cross-entropy of one logit against 0/1, or squared error."""
  return _LOSS_FNS[loss](outputs, targets)


def chunked_softmax_ce(project, features, targets, chunk_len: int):
  """pointwise_loss("softmax", project(features), targets), `chunk_len` positions
  at a time: the [batch, length, vocab] logits never exist at once, and the
  backward pass recomputes each chunk's logits (jax.checkpoint) instead of
  keeping them. Chunks run along the length, so the batch keeps its sharding."""
  b, t, e = features.shape
  chunks = lambda x: x.reshape(b, t // chunk_len, chunk_len, *x.shape[2:]).swapaxes(0, 1)
  whole = lambda x: x.swapaxes(0, 1).reshape(b, t)

  @jax.checkpoint
  def one(args):
    f, y = args
    return pointwise_loss("softmax", project(f), y)

  ce, correct = jax.lax.map(one, (chunks(features), chunks(targets)))
  return whole(ce), whole(correct)
