"""End-to-end learning check: each model kind memorises one tiny fixed batch.

Uses the real training step (bigjax.steps) on a one-device mesh, so the loss,
masking, optimiser and parameter plumbing are all exercised together.
"""
import math

import jax
import numpy as np
import pytest

from bigjax import sharding, steps
from configs import lm

VOCAB = 64
BATCH, SEQ = 4, 16
STEPS = 250


def _config(kind: str):
  config = lm.get_config("runlocal")
  config.total_steps = 2000  # the cosine schedule stays near its peak for STEPS steps
  config.batch_size = BATCH
  config.seq_len = SEQ
  config.model.update(kind=kind, vocab_size=VOCAB, num_layers=2, emb_dim=64, num_heads=4,
                      mlp_dim=128, max_len=SEQ + 1, dtype="float32", dropout_rate=0.0)
  config.optim.update(name="adamw", lr=5e-3, warmup_steps=10, weight_decay=0.0)
  config.task = "reverse" if kind == "encdec" else "lm"  # The task feeds the model its batch.
  return config


def _batch(kind: str) -> dict:
  rng = np.random.default_rng(0)
  if kind == "encdec":
    # Random source -> random target: the decoder must read the encoder to get
    # even its first token right, since every row starts with the same BOS.
    targets = rng.integers(1, VOCAB, (BATCH, SEQ)).astype(np.int32)
    decoder_inputs = np.concatenate([np.ones((BATCH, 1), np.int32), targets[:, :-1]], 1)
    return {"encoder_inputs": rng.integers(1, VOCAB, (BATCH, SEQ)).astype(np.int32),
            "decoder_inputs": decoder_inputs, "targets": targets,
            "weights": np.ones((BATCH, SEQ), np.float32)}
  # Next-token prediction on random sequences; the first input token tells the
  # rows apart, so every target is determined by its prefix.
  tokens = rng.integers(1, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  weights = np.ones((BATCH, SEQ), np.float32)
  weights[-1, -3:] = 0.0  # a few ignored targets: weights must be honoured
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_overfits_one_batch(kind):
  config = _config(kind)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  setup = steps.make_setup(config, mesh)
  state = steps.create_state(setup, seed=0)
  train_step = steps.make_train_step(setup)
  batch = _batch(kind)

  losses, accuracies = [], []
  for _ in range(STEPS):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))

  assert int(state.step) == STEPS
  assert all(math.isfinite(x) for x in losses)
  # Starts near chance (uniform over the vocabulary)...
  assert abs(losses[0] - math.log(VOCAB)) < 0.5, losses[0]
  # ...and memorises the batch.
  assert losses[-1] < 0.05, losses[-10:]
  assert accuracies[-1] == 1.0
  assert min(losses[: STEPS // 4]) > losses[-1]

  # The eval step agrees with the training metrics on the memorised batch.
  sums = steps.make_eval_step(setup)(state.params, state.model_state, batch)
  weight_sum = float(sums["weight_sum"])
  assert weight_sum == batch["weights"].sum()
  assert float(sums["loss_sum"]) / weight_sum < 0.05
  assert float(sums["correct_sum"]) == weight_sum
