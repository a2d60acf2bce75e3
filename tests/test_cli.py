"""Command-line overrides: a mistyped key or a wrong type fails naming the key,
and a value the run cannot use fails before training, naming the fields."""
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


@pytest.mark.parametrize("flag, field", [
    ("--config.optim.freeze=^embeder/", "config.optim.freeze"),  # matches no parameter
    ("--config.model.attention_impl=cudnn", "config.model.attention_impl"),  # not on a CPU
])
def test_settings_found_wrong_while_building_are_one_line_errors(tmp_path, flag, field):
  """Checked against the parameters or the device (when the step is built), not by
  config.validate: still one 'Invalid config' line naming the field, no traceback."""
  r = _run(f"--workdir={tmp_path}", flag)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith(f"Invalid config: {field}")
  assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_unknown_config_arg(tmp_path):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlokal",
         f"--workdir={tmp_path}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "runlokal" in r.stderr


def test_sample_longer_than_max_len_is_rejected_before_training(tmp_path):
  # runlocal: max_len=32; the end-of-run sample continues a 4-byte prompt.
  r = _run(f"--workdir={tmp_path}", "--config.sample_tokens=29")
  assert r.returncode != 0
  assert ("config.sample_tokens: 29 tokens after the 4-token prompt 'def ' exceed "
          "model.max_len=32. Set sample_tokens <= 28" in r.stderr), r.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
  from bigjax import tasks
  from configs import lm
  config = lm.get_config("runlocal")
  config.sample_tokens = 28
  tasks.get("lm").validate(config)  # Exactly fits: no error.


def test_labels_past_num_outputs_are_rejected_before_training(tmp_path):
  # Digits: class ids 0..9, which 5 outputs cannot score (the loss was NaN).
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/mlp.py:runlocal",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.model.num_outputs=5"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "config.model.num_outputs=5" in r.stderr and "config.data.label_key" in r.stderr
  assert "Set --config.model.num_outputs=10" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_router_metrics_list_expert_loads_in_expert_order(tmp_path):
  """12 experts: expert_10 and expert_11 come after expert_9, not after expert_1."""
  import json

  from bigjax import report
  layer = "moe/decoder/blocks/1/ffn"
  row = {"step": 20, "loss": 1.0, **{f"{layer}/{k}": 0.5 for k in
                                      ("aux_loss", "z_loss", "dropped", "router_entropy")},
         **{f"{layer}/load/expert_{e}": e / 100 for e in range(12)}}
  (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
  (header, line) = report.router_metrics_lines(str(tmp_path))
  assert header == "Router metrics at step 20:"
  shown = line.split("load=[")[1].split("]")[0].split()
  assert shown == [f"{e / 100:.2f}" for e in range(12)]
