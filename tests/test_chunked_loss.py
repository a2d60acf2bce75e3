"""config.loss_chunk_len: the output projection and softmax loss in chunks of the
length give the loss and gradients of the whole-sequence computation, and keep the
[batch, length, vocab] logits out of the compiled program's memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import sharding, steps
from configs import lm, t5


def _setup(config):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return steps.make_setup(config, mesh)


def _batch(config, rng):
  b, t = config.batch_size, config.seq_len
  tokens = lambda: jnp.asarray(rng.integers(3, 259, (b, t)), jnp.int32)
  batch = {"targets": tokens(), "weights": jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)}
  if config.model.kind == "encdec":
    batch.update(encoder_inputs=tokens(), decoder_inputs=tokens())
  else:
    batch["inputs"] = tokens()
  return batch


def _loss_and_grads(config, chunk, batch):
  config.loss_chunk_len = chunk
  setup = _setup(config)
  state = steps.create_state(setup, 0)
  model_state = state.model_state

  def loss(params):
    sums = steps.loss_sums(setup.task, setup.model(params, model_state), batch, None,
                           loss_chunk_len=setup.loss_chunk_len)
    return sums["loss_sum"] / sums["weight_sum"], sums["correct_sum"]

  (value, correct), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
  return float(value), float(correct), grads


def _numpy_loss(config, batch):
  """The weighted mean cross-entropy and weighted correct count, in float64 numpy
  from one plain forward pass's logits: sum w (logsumexp(z) - z[y]) / sum w."""
  config.loss_chunk_len = 0
  setup = _setup(config)
  state = steps.create_state(setup, 0)
  model = setup.model(state.params, state.model_state)
  if config.model.kind == "encdec":
    logits = model(batch["encoder_inputs"], batch["decoder_inputs"])
  else:
    logits = model(batch["inputs"])
  z = np.asarray(logits, np.float64)
  y, w = np.asarray(batch["targets"]), np.asarray(batch["weights"], np.float64)
  top = z.max(-1)
  nll = top + np.log(np.exp(z - top[..., None]).sum(-1)) - np.take_along_axis(
      z, y[..., None], -1)[..., 0]
  return (w * nll).sum() / w.sum(), (w * (z.argmax(-1) == y)).sum()


@pytest.mark.parametrize("make", [lambda: lm.get_config("runlocal"),
                                  lambda: t5.get_config("runlocal")], ids=["decoder", "encdec"])
def test_chunked_loss_and_gradients_equal_whole_sequence(make):
  config = make()
  config.mesh.update(data=1)
  config.update(batch_size=4, seq_len=8)
  batch = _batch(config, np.random.default_rng(0))
  whole, correct, grads = _loss_and_grads(config, 0, batch)
  chunked, correct_c, grads_c = _loss_and_grads(config, 2, batch)
  assert abs(whole - chunked) < 1e-5 * abs(whole) and correct == correct_c
  # Both against the textbook weighted loss: a fifth of the targets carry weight 0.
  want, want_correct = _numpy_loss(config, batch)
  assert abs(whole - want) < 1e-5 * want and correct == want_correct
  for g, gc in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(np.asarray(gc), np.asarray(g), rtol=1e-5, atol=1e-7)


def test_chunks_keep_the_logits_out_of_memory():
  config = lm.get_config("runlocal")
  config.mesh.update(data=1)
  config.update(batch_size=8, seq_len=256)
  config.model.update(vocab_size=32_768, max_len=256)
  batch = _batch(config, np.random.default_rng(0))
  temp = {}
  for chunk in (0, 32):
    config.loss_chunk_len = chunk
    setup = _setup(config)
    state = jax.eval_shape(lambda: steps.create_state(setup, 0))
    compiled = steps.make_train_step(setup).lower(state, batch).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 8 * 256 * 32_768 * 4
  # Whole: the logits and their gradient (or softmax) live at once; chunked: an
  # eighth of them at a time.
  assert temp[0] - temp[32] > logits_bytes, (temp, logits_bytes)
