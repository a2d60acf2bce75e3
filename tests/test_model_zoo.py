"""The model zoo: each config trains through the same loop on real shipped data
and reaches its stated number, checked against an independent reference where
one exists (numpy least squares, sklearn's arrays, a chance baseline)."""
import os
import re

import jax
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from bigjax import metrics, sharding, steps, tasks, train
from bigjax.data import examples, pipeline, tokenizer
from configs import cnn, linear_regression, mlp, t5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("zoo_data"))


def _run(config, data_dir, workdir):
  config.data.data_dir = data_dir
  return train.run(config, str(workdir))


def test_linear_regression_sgd_matches_closed_form_least_squares(data_dir, tmp_path):
  result = _run(linear_regression.get_config(), data_dir, tmp_path)
  head = jax.device_get(result.state.params)["head"]["dense"]
  slope, intercept = float(head["kernel"][0, 0]), float(head["bias"][0])

  # numpy on sklearn's own arrays: BMI (column 2), the i % 5 == 0 rows held out.
  x, y = sklearn.datasets.load_diabetes(return_X_y=True)
  train_rows = np.arange(len(x)) % 5 != 0
  bmi = x[train_rows, 2]
  z = (bmi - bmi.mean()) / bmi.std()
  (ls_slope, ls_intercept), *_ = np.linalg.lstsq(np.c_[z, np.ones_like(z)], y[train_rows],
                                                 rcond=None)
  np.testing.assert_allclose([slope, intercept], [ls_slope, ls_intercept], rtol=1e-3)
  # The eval loss is the held-out mean squared error of that line.
  z_test = (x[~train_rows, 2] - bmi.mean()) / bmi.std()
  mse = np.mean((ls_slope * z_test + ls_intercept - y[~train_rows]) ** 2)
  np.testing.assert_allclose(result.eval_metrics["eval_loss"], mse, rtol=2e-3)
  # Run again (a notebook cell run twice): nothing to train, the same result.
  again = _run(linear_regression.get_config(), data_dir, tmp_path)
  assert again.already_finished and again.eval_metrics == pytest.approx(result.eval_metrics)


@pytest.mark.parametrize("module, arg, accuracy", [
    (mlp, "variant=binary", 0.95),  # Breast cancer, sigmoid BCE; ~97%.
    (mlp, "variant=deep", 0.96),  # Digits, BatchNorm + dropout; ~99%.
    (cnn, "", 0.97),  # Digits; ~99%.
])
def test_classifiers_reach_their_stated_test_accuracy(data_dir, tmp_path, module, arg,
                                                      accuracy):
  result = _run(module.get_config(arg), data_dir, tmp_path)
  assert result.eval_metrics["eval_accuracy"] >= accuracy, result.eval_metrics


def test_batchnorm_statistics_train_resume_and_serve_eval(data_dir, tmp_path):
  config = mlp.get_config("variant=deep,runlocal")
  config.total_steps = 20
  config.checkpoint_every = 10
  straight = _run(config.copy_and_resolve_references(), data_dir, tmp_path / "a")
  stats = jax.device_get(straight.state.model_state)
  means = stats["hidden"][0]["norm"]["mean"]
  assert np.abs(means).max() > 1e-3  # Running averages moved off their zero init.

  # Ten steps, then a rerun to twenty: the same parameters and statistics, bit for bit.
  short = config.copy_and_resolve_references()
  short.total_steps = 10
  _run(short, data_dir, tmp_path / "b")
  resumed = _run(config, data_dir, tmp_path / "b")
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)),
                  jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)

  # Evaluation normalises with the running averages: a row's output does not
  # depend on which other rows share its batch.
  setup = straight.setup
  x, _ = examples.load_split("sklearn_toy/digits", "test", data_dir)
  model = setup.model(jax.device_get(straight.state.params), stats)
  together = np.asarray(model(x[:16]))
  alone = np.concatenate([np.asarray(model(x[i:i + 1])) for i in range(16)])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_batchnorm_normalises_inputs_far_from_zero_as_float64_does():
  """Features of mean 3,000 and std 1 (a year, a pressure in Pa): E[x^2] - E[x]^2 in
  float32 loses the variance (flax's fast form gave outputs of std 246 here)."""
  from flax import nnx
  from bigjax.models import zoo
  norm = zoo._batch_norm(zoo.ZooConfig(), 4, nnx.Rngs(0))
  x = 3000.0 + np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  got = np.asarray(norm(x))  # Training mode: the batch's statistics.
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + norm.epsilon)
  np.testing.assert_allclose(got, want, atol=1e-3)
  np.testing.assert_allclose(np.asarray(norm.var[...]), 0.9 + 0.1 * x64.var(0), rtol=1e-3)


def test_sharded_batchnorm_training_equals_one_device(data_dir):
  """data=4 x tensor=2 over 8 devices: BatchNorm's batch statistics are taken over
  the global batch, so parameters and running averages match one device's."""
  config = mlp.get_config("variant=deep")
  config.model.dropout_rate = 0.0
  x, y = examples.load_split("sklearn_toy/digits", "train", data_dir)
  data = examples.ExampleBatches(x, y, global_batch_size=64, seed=0)
  states = []
  for mesh_cfg, devices in ((dict(data=4, tensor=2), jax.devices()),
                            (dict(data=1), jax.devices()[:1])):
    setup = steps.make_setup(config, sharding.make_mesh(mesh_cfg, devices), x.shape[1:])
    state, train_step = steps.create_state(setup, 0), steps.make_train_step(setup)
    for step in range(5):
      state, _ = train_step(state, data.batch(step))
    states.append(jax.device_get((state.params, state.model_state)))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_cnn_trains_on_mnist_where_prepared(tmp_path):
  config = cnn.get_config("mnist,runlocal")
  config.total_steps = 4
  config.batch_size = 16
  config.log_every = config.eval_every = config.checkpoint_every = 4
  with tfds.testing.mock_data(num_examples=64):
    result = train.run(config, str(tmp_path))
  assert np.isfinite(result.eval_metrics["eval_loss"])
  assert result.setup.abstract_state.params["mlp"]["hidden"][0]["dense"]["kernel"].shape == (
      7 * 7 * 64, 128)  # 28x28 pooled twice, 64 channels.


def test_t5_style_encoder_decoder_learns_to_reverse_corpus_chunks(data_dir, tmp_path):
  result = _run(t5.get_config("runlocal"), data_dir, tmp_path)
  # A model blind to the input can do no better than the most common byte.
  tokens = np.asarray(pipeline.token_array("stdlib_py", "validation", data_dir)[:100_000])
  chance = np.bincount(tokens).max() / tokens.size
  assert chance < 0.4  # Spaces: ~30% of the bytes.
  assert result.eval_metrics["eval_accuracy"] > 0.7, result.eval_metrics


def test_bert_style_encoder_reads_the_right_context_to_fill_masks():
  """A corpus of random letters, each written twice ("qqbbkk..."): a masked
  first copy is known only from the letter to its right, so a model reading the
  left context alone is at chance (1/16) on first copies."""
  from configs import bert

  config = bert.get_config("runlocal")
  config.update(seq_len=32, batch_size=32, total_steps=500)
  config.optim.warmup_steps = 50
  letters = np.random.default_rng(0).integers(0, 16, 32_000)
  tokens = np.repeat(tokenizer.encode(b"abcdefghijklmnop")[letters], 2).astype(np.uint16)
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh))
  state = steps.create_state(setup, 0)
  train_step, eval_step = steps.make_train_step(setup), steps.make_eval_step(setup)
  masks = tasks.masked_examples(config.data.mask_rate)
  data = pipeline.LMBatches(tokens, global_batch_size=32, seq_len=32, seed=0, examples=masks)
  for step in range(config.total_steps):
    state, _ = train_step(state, data.batch(step))
  masked = pipeline.eval_batches(tokens, global_batch_size=32, seq_len=32, num_batches=8,
                                 examples=masks)
  for batch in masked:
    batch["weights"][:, 1::2] = 0  # Grade first copies only.
  sums = [jax.device_get(eval_step(state.params, state.model_state, b)) for b in masked]
  accuracy = sum(s["correct_sum"] for s in sums) / sum(s["weight_sum"] for s in sums)
  assert accuracy > 0.3, accuracy  # ~0.5 after 500 steps; chance is 0.0625.


def test_zoo_table_script_reads_results_back_from_workdirs(tmp_path):
  import subprocess
  import sys

  cmd = [sys.executable, "experiments/zoo.py", f"--root={tmp_path}", "--arg=runlocal",
         "--only=mlp_binary,linear_regression", "--", "--config.total_steps=20"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  first = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = {line.split("|")[1].strip(): line for line in first.stdout.splitlines()
          if line.startswith("| ")}
  for name, label in (("mlp_binary", "test accuracy"), ("linear_regression", "test MSE")):
    assert f"| 20 | {label} " in rows[name], rows[name]
    assert ",runlocal --config.total_steps=20`" in rows[name] or (
        ":runlocal --config.total_steps=20`" in rows[name]), rows[name]
    evals = [r for r in metrics.read_jsonl(tmp_path / name / "metrics.jsonl")
             if "eval_loss" in r]
    assert evals[-1]["step"] == 20
  assert "no evaluation yet" in rows["cnn_digits"]
  # The linear model's line: "linear_regression (step 20): w = W, b = B; least
  # squares: W_LS, B_LS". The least-squares fit as numpy finds it on sklearn's
  # arrays; w and b as the held-out MSE the run logged at step 20 says they are.
  (line,) = [l for l in first.stdout.splitlines() if l.startswith("linear_regression (")]
  w, b, ls_w, ls_b = map(float, re.fullmatch(
      r"linear_regression \(step 20\): w = (\S+), b = (\S+); least squares: (\S+), (\S+)",
      line).groups())
  x, y = sklearn.datasets.load_diabetes(return_X_y=True)
  train_rows = np.arange(len(x)) % 5 != 0
  bmi = x[train_rows, 2]
  z = (bmi - bmi.mean()) / bmi.std()
  ref, *_ = np.linalg.lstsq(np.c_[z, np.ones_like(z)], y[train_rows], rcond=None)
  np.testing.assert_allclose([ls_w, ls_b], ref, atol=1e-3)
  z_test = (x[~train_rows, 2] - bmi.mean()) / bmi.std()
  mse = np.mean((w * z_test + b - y[~train_rows]) ** 2)
  evals = [r for r in metrics.read_jsonl(tmp_path / "linear_regression" / "metrics.jsonl")
           if "eval_loss" in r]
  np.testing.assert_allclose(evals[-1]["eval_loss"], mse, rtol=2e-4)
  assert abs(w - ls_w) > 1  # 20 steps: not yet at the optimum, so w is the run's own.
  # Rerunning resumes the finished runs (nothing to train) and prints the same results.
  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  strip = lambda out: [l.rsplit("|", 2)[0] for l in out.splitlines() if l.startswith("| ")]
  assert strip(again.stdout) == strip(first.stdout)
  walls = lambda out: {l.split("|")[1].strip(): l.rsplit("|", 2)[1].strip()
                       for l in out.splitlines() if l.startswith("| ") and "---" not in l}
  assert walls(first.stdout)["mlp_binary"].isdigit()
  assert walls(again.stdout)["mlp_binary"] == "-"  # Not trained by this invocation.


def test_gradient_accumulation_with_batchnorm_is_said_not_to_be_one_big_batch():
  from bigjax import train
  config = mlp.get_config("variant=deep,runlocal")
  config.grad_accum_steps = 2
  assert any(n.startswith("grad_accum_steps=2 with BatchNorm: each microbatch is normalised "
                          "by its own statistics") for n in train._notes(config))
  config.model.batch_norm = False
  assert not any("BatchNorm" in n for n in train._notes(config))
