"""Command-line overrides: a mistyped key or a wrong type fails naming the key."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, key", [
    ("--config.model.num_layerz=3", "num_layerz"),  # unknown key
    ("--config.batchsize=4", "batchsize"),
    ("--config.model.num_layers=two", "num_layers"),  # wrong type
    ("--config.optim.lr=fast", "lr"),
])
def test_bad_override_names_the_key(tmp_path, flag, key):
  r = _run(f"--workdir={tmp_path}", flag)
  assert r.returncode != 0
  assert key in r.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_invalid_value_is_rejected_before_compiling(tmp_path):
  r = _run(f"--workdir={tmp_path}", "--config.model.num_heads=3")
  assert r.returncode != 0
  assert "config.model.num_heads" in r.stderr and "emb_dim" in r.stderr


def test_unknown_config_arg(tmp_path):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlokal",
         f"--workdir={tmp_path}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "runlokal" in r.stderr
