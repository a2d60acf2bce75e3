"""A run recorded before a setting existed: today's code reads its config.json
with the value that run used (bigjax/recorded_config.py) wherever it compares
or rebuilds, so a resume or a mismatch report lists only what really changed."""
import json

from bigjax import checkpoint_errors, recorded_config, train
from configs import lm


def _older_run(tmp_path, config) -> str:
  """A workdir whose config.json predates norm_eps and attention_impl."""
  values = json.loads(config.to_json_best_effort())
  for key in ("norm_eps", "attention_impl"):
    del values["model"][key]
  (tmp_path / "config.json").write_text(json.dumps(values))
  return str(tmp_path)


def test_a_resume_of_an_older_run_lists_only_what_changed(tmp_path, capsys):
  config = lm.get_config("runlocal")
  # Today's defaults equal what the older run used, except attention_impl.
  config.model.norm_eps = recorded_config.SETTINGS_OLDER_RUNS_USED["norm_eps"]
  workdir = _older_run(tmp_path, config)
  config.total_steps += 5
  train._record_config(config, workdir, start=7)
  line = next(l for l in capsys.readouterr().out.splitlines() if "changed settings" in l)
  assert "total_steps" in line and "norm_eps" not in line, line
  assert "model.attention_impl: 'xla' -> 'auto'" in line, line  # What that run used.


def test_a_mismatch_report_compares_with_the_settings_the_run_used(tmp_path):
  config = lm.get_config("runlocal")
  config.model.norm_eps = recorded_config.SETTINGS_OLDER_RUNS_USED["norm_eps"]
  workdir = _older_run(tmp_path, config)
  config.model.emb_dim *= 2
  diff = checkpoint_errors.config_diff(workdir, config)
  assert "model.emb_dim" in diff and "norm_eps" not in diff, diff
  assert "model.attention_impl: 'xla' in config.json, 'auto' now" in diff, diff
