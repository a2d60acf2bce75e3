"""A task is one definition plus one registry line: this file adds "copy the
input" (an encoder outputs its input at every position) without touching
bigjax/, and trains it through the normal loop (train.run)."""
import math

import numpy as np
import pytest

from bigjax import config as config_lib, tasks, train
from bigjax.data import tokenizer
from configs import lm

SYMBOLS = 16  # Inputs are uniform over this many byte ids.


class StepIndexedCopies:
  """Random rows of SYMBOLS ids; batch(step) is a pure function of (seed, step)."""

  def __init__(self, rows: int, length: int, seed: int):
    self.rows, self.length, self.seed = rows, length, seed

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng((self.seed, step))
    ids = rng.integers(0, SYMBOLS, (self.rows, self.length)) + tokenizer.OFFSET
    ids = ids.astype(np.int32)
    return {"inputs": ids, "targets": ids, "weights": np.ones(ids.shape, np.float32)}


class Copy(tasks.Task):
  name, model_kinds, loss = "copy", ("encoder",), "softmax"

  def load_data(self, config, process_index, process_count):
    rows = config.batch_size // process_count
    train_data = StepIndexedCopies(rows, config.seq_len, config.seed + process_index)
    held_out = StepIndexedCopies(rows, config.seq_len, 10_000 + process_index)
    return tasks.TaskData(train_data, [held_out.batch(i) for i in range(2)])

  def throughput(self, config):
    return config.batch_size * config.seq_len, "tokens"


@pytest.fixture
def copy_task():
  task = tasks.register(Copy())
  yield task
  del tasks.REGISTRY[task.name]


def _config():
  config = lm.get_config("runlocal")
  config.task = "copy"
  config.model.kind = "encoder"
  config.update(total_steps=60, seq_len=8, log_every=1, eval_every=60, checkpoint_every=60)
  config.model.update(num_layers=1, max_len=8)
  config.optim.update(lr=1e-2, warmup_steps=5)
  return config


def test_a_registered_task_trains_through_the_loop(copy_task, tmp_path):
  result = train.run(_config(), str(tmp_path))
  assert result.setup.task is copy_task
  rows = [r for r in _metrics(tmp_path) if "loss" in r]
  # Untrained: uniform over the model's vocabulary, worse than guessing among the
  # SYMBOLS inputs; trained: every held-out position copied exactly.
  assert rows[0]["loss"] > math.log(SYMBOLS)
  assert result.eval_metrics["eval_accuracy"] == 1.0
  assert result.eval_metrics["eval_loss"] < 0.05 * math.log(SYMBOLS)


def test_the_config_names_the_registered_tasks(copy_task):
  config = _config()
  config.model.kind = "decoder"
  with pytest.raises(config_lib.ConfigError, match="model.kind.*'decoder' does not train on "
                     "task='copy'"):
    config_lib.validate(config, num_devices=8)
  config.task = "paste"
  with pytest.raises(config_lib.ConfigError, match="config.task: unknown task 'paste'.*'copy'"):
    config_lib.validate(config, num_devices=8)


def _metrics(workdir):
  from bigjax import metrics
  return metrics.read_jsonl(str(workdir / "metrics.jsonl"))
