"""bigjax's GPT-2 and Mixtral-style models compute what HF transformers' do.

An implementation bigjax did not write: the same weights (every one random,
biases included, not the zeros or ones of an initialisation) copied into HF's
GPT2LMHeadModel / MixtralForCausalLM must give the same logits. Needs the
benchmark extra (`pip install -e '.[bench]'`: torch, transformers); skipped
without it. experiments/benchmarks/peer.py prints the same check at full size.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bigjax import steps  # noqa: E402
from bigjax.models import layers, transformer  # noqa: E402
from configs import gpt2  # noqa: E402

from experiments.benchmarks import hf_models  # noqa: E402


LENGTH = 128


def _tiny_config(arch):
  config = gpt2.get_config("runlocal")
  # 128 tokens: a causal self-attention scored in row blocks (layers.CAUSAL_BLOCKS).
  config.model.update(num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, max_len=LENGTH,
                      vocab_size=64, dropout_rate=0.0, dtype="float32")
  if arch == "mixtral":
    config = hf_models.mixtral_like(config)
    config.model.use_bias = False  # Mixtral has no biases.
  return config


def _random_params(config, seed=0):
  """Every parameter drawn at random (scale 0.3), so that no mapping error hides
  behind a zero bias or a unit norm scale."""
  model = transformer.build(steps.model_config(config), nnx.Rngs(0))
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return model, jax.tree.unflatten(
      tree, [rng.normal(0, 0.3, np.shape(x)).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_same_weights_give_hf_logits(arch):
  config = _tiny_config(arch)
  model, params = _random_params(config)
  nnx.update(model, params)
  tokens = np.random.default_rng(1).integers(1, 64, (2, LENGTH))
  assert layers.causal_block_count(LENGTH) > 1
  ours = np.asarray(model(jax.numpy.asarray(tokens)))
  hf = hf_models.load(arch, params, hf_models.build(arch, config)).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
  assert ours.std() > 0.5  # Random weights: logits far from uniform.
  np.testing.assert_allclose(ours, theirs, atol=2e-4 * ours.std(), rtol=1e-4)


def test_biases_change_the_gpt2_function():
  """The bias mapping is exercised: zeroing bigjax's biases changes the logits."""
  config = _tiny_config("gpt2")
  model, params = _random_params(config)
  nnx.update(model, params)
  tokens = np.random.default_rng(1).integers(1, 64, (2, 16))
  with_bias = np.asarray(model(jax.numpy.asarray(tokens)))
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "bias" in jax.tree_util.keystr(p)
      and "norm" not in jax.tree_util.keystr(p) else x, params)
  nnx.update(model, zeroed)
  assert np.abs(np.asarray(model(jax.numpy.asarray(tokens))) - with_bias).max() > 0.1


@pytest.mark.slow
def test_peer_speed_part_runs_at_a_tiny_shape():
  """peer.py --part=speed, both architectures, end to end (one device, as its
  README figures ran): CI, without the bench extra, never runs this path."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  done = subprocess.run(
      [sys.executable, "experiments/benchmarks/peer.py", "--part=speed",
       "--speed_shape=1,64,2,128,32,2", "--rounds=2", "--steps_per_round=1"],
      cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for text in ("Speed (gpt2)", "Speed (mixtral)", "over the rounds", "MFU",
               "The MoE layer alone", "The step's matmuls alone"):
    assert text in done.stdout, done.stdout
  assert done.stdout.count("bigjax / pytorch") == 4, done.stdout
