"""Command-line overrides: a mistyped key or a wrong type fails naming the key,
and a value the run cannot use fails before training, naming the fields."""
import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest

from configs import common

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


def _last_line(r) -> str:
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  return lines[-1] if lines else ""


@pytest.mark.parametrize("bad, good, problem", [
    # A key of another section (optim has lr): the section's keys, sorted.
    ("--config.model.lr=1", "--config.optim.lr=2", "config.model has no key 'lr'. Its keys: "),
    ("--config.optim.learning_rate=1e-3", "--config.model.num_layers=3",
     "config.optim has no key 'learning_rate'. Its keys: "),
    # A section that is not there, close to one that is: the flag, corrected.
    ("--config.optimizer.lr=1e-3", "--config.model.num_layers=3",
     "config has no key 'optimizer'. Did you mean --config.optim.lr=1e-3?"),
])
def test_override_of_a_missing_key_names_that_flag(tmp_path, bad, good, problem):
  from configs import lm
  config = lm.get_config("runlocal")
  for flags in ((good, bad), (bad, good)):
    r = _run(f"--workdir={tmp_path}", *flags)
    assert r.returncode == 1
    line = _last_line(r)
    assert line.startswith(f"Error: {bad}: {problem}"), r.stderr[-2000:]
    assert good not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    if "Its keys: " in problem:
      section = config[bad.split(".")[1]]
      assert line.split("Its keys: ")[1] == ", ".join(sorted(section.keys())) + "."
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_error_in_the_config_file_names_its_line_not_an_override(tmp_path):
  """A config file whose get_config raises (a KeyError of its own): the file and
  line, even with an override on the command line."""
  path = tmp_path / "broken.py"
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  "  config = ml_collections.ConfigDict({'seed': 0})\n"
                  "  return config['warmup']\n")
  cmd = [sys.executable, "-m", "bigjax.main", f"--config={path}",
         f"--workdir={tmp_path / 'run'}", "--config.seed=1"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert _last_line(r) == f"Error: --config={path}: KeyError: 'warmup' ({path} line 6).", r.stderr


def test_sharding_rules_are_overridden_from_the_command_line(tmp_path, corpus_data_dir):
  """A tuple field (ml_collections refuses lists): the value is a Python literal,
  and the run uses it (config.json records it)."""
  from configs import common
  rules = tuple(("activation_batch", ("data",)) if rule[0] == "activation_batch" else rule
                for rule in common.default_rules())
  assert rules != common.default_rules()
  r = _run(f"--workdir={tmp_path}", f"--config.data.data_dir={corpus_data_dir}",
           "--config.total_steps=2", "--config.eval_every=100", "--config.checkpoint_every=100",
           f"--config.sharding_rules={rules!r}")
  assert r.returncode == 0, r.stderr[-2000:]
  recorded = json.loads((tmp_path / "config.json").read_text())["sharding_rules"]
  assert recorded == json.loads(json.dumps(rules))
  # Two steps of the runlocal config's 5-step warmup: said, not silently so.
  assert ("Note: optim.warmup_steps=5 >= total_steps=2: the learning rate rises for the "
          "whole run and never reaches optim.lr=0.003." in r.stdout), r.stdout[-2000:]


@pytest.mark.parametrize("value, field", [
    ("(('activation_batch', ('data',)), ('embed',))", "config.sharding_rules[1]"),  # No axes.
    ("(('activation_batch', ('data',)), ('embed', 'fdsp'))", "config.sharding_rules[1]"),
    ("(('embed', 'fsdp'),)", "config.sharding_rules"),  # No rule for activation_batch.
    ("embed", "config.sharding_rules[0]"),  # Not a literal: a 1-tuple of the string.
    # Well formed, but without a rule for a name the model uses.
    (repr(tuple(r for r in common.default_rules() if r[0] != "heads")),
     "config.sharding_rules: logical axis 'heads' has no entry"),
])
def test_malformed_sharding_rules_override_is_one_line(tmp_path, value, field):
  r = _run(f"--workdir={tmp_path}", f"--config.sharding_rules={value}")
  assert r.returncode == 1
  assert _last_line(r).startswith(f"Invalid config: {field}"), r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def _file_size_limit(limit: int):
  """For preexec_fn: writes past `limit` bytes fail with EFBIG ('File too
  large'), as on a full disk (see tests/test_survival_disk_full.py)."""
  def set_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the kernel kills the writer.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return set_limit


@pytest.mark.slow
def test_failed_write_in_the_workdir_is_one_line_and_the_rerun_resumes(tmp_path,
                                                                        corpus_data_dir):
  """A finished run extended on a full disk: rewriting its config.json fails.
  One line saying what failed and why, no traceback; the same command resumes."""
  workdir = tmp_path / "run"
  flags = [f"--workdir={workdir}", f"--config.data.data_dir={corpus_data_dir}",
           "--config.eval_every=100", "--config.checkpoint_every=2"]
  first = _run(*flags, "--config.total_steps=2")
  assert first.returncode == 0, first.stderr[-2000:]
  limit = (workdir / "config.json").stat().st_size // 2

  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal", *flags,
         "--config.total_steps=4"]
  full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        preexec_fn=_file_size_limit(limit))
  assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  # The file named is the one whose write failed (config.json, or the copy of the
  # record that extending a run keeps).
  assert re.fullmatch(
      re.escape(f"Error: writing {workdir}{os.sep}") + r"config\S*\.json" + re.escape(
          " failed (File too large): free space or choose another --workdir; rerun the "
          "same command to resume."), _last_line(full)), full.stderr[-2000:]

  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resumed from the checkpoint at step 2." in again.stdout
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 4


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


@pytest.mark.parametrize("config, flags, message", [
    ("cnn.py:runlocal", ["--config.model.conv_features=(8, 16, 32, 64)"],
     "config.model.conv_features: 4 conv stages halve the 8x8 images to nothing. Use at "
     "most 3 stages."),
    ("mlp.py:variant=binary,runlocal", ["--config.model.kind=cnn",
                                        "--config.model.conv_features=(8,)"],
     "config.model.kind: 'cnn' needs images [H, W, C]"),
])
def test_a_zoo_model_that_does_not_fit_its_data_is_one_line(tmp_path, config, flags, message):
  """Found when the model is built for the data's shape: still one line, before training."""
  cmd = [sys.executable, "-m", "bigjax.main", f"--config=configs/{config}",
         f"--workdir={tmp_path}", *flags]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith(f"Invalid config: {message}"), r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "checkpoints").exists()


def test_unknown_config_arg(tmp_path):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlokal",
         f"--workdir={tmp_path}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "runlokal" in r.stderr


def test_a_config_arg_that_is_not_a_boolean_is_refused():
  # runlocal=on would otherwise have loaded the full-size config, silently.
  assert common.parse_arg("runlocal=off", runlocal=True).runlocal is False
  assert common.parse_arg("runlocal=Yes", runlocal=False).runlocal is True
  with pytest.raises(ValueError, match="runlocal='ture' is not a boolean"):
    common.parse_arg("runlocal=ture", runlocal=False)


def test_an_entry_of_a_tuple_setting_names_the_whole_override(tmp_path):
  r = _run(f"--workdir={tmp_path}", "--config.sharding_rules[0]=('vocab',None)")
  assert r.returncode == 1
  assert _last_line(r) == ("Error: --config.sharding_rules[0]=('vocab',None): "
                           "config.sharding_rules is a tuple, whose entries cannot be set one "
                           "by one. Override it whole: --config.sharding_rules=(...)."), r.stderr


def test_a_task_that_draws_no_sample_refuses_sample_tokens():
  from bigjax import config as config_lib
  from configs import t5
  config = t5.get_config("runlocal")
  config.sample_tokens = 6
  with pytest.raises(config_lib.ConfigError, match=r"config\.sample_tokens: task='reverse' "
                     "draws no sample"):
    config_lib.validate(config, num_devices=1)


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


def test_a_failed_file_outside_the_workdir_is_not_blamed_on_it():
  """The one line for an OSError names the file; another --workdir is suggested
  only for a file in the workdir (gs:// paths are used as they are)."""
  import errno

  from bigjax import cli_errors

  denied = PermissionError(errno.EACCES, "Permission denied", "/data/tokens.npy")
  line = cli_errors.os_error_line(denied, "/tmp/run")
  assert line == ("Error: using /data/tokens.npy failed (Permission denied): fix that "
                  "(permissions, a read-only or failing disk, the network); rerun the same "
                  "command to resume.")
  full = OSError(errno.ENOSPC, "No space left on device", "/tmp/run/config.json")
  assert "free space or choose another --workdir" in cli_errors.os_error_line(full, "/tmp/run")
  assert "another --workdir" in cli_errors.os_error_line(
      OSError(errno.ENOSPC, "No space left on device"), "/tmp/run")
