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


# Model settings added since the first recorded runs (2026-11-23), from the git
# history of TransformerConfig and MoEConfig: a run of that day recorded none.
ADDED_MODEL_SETTINGS = ("norm_eps", "relative_buckets", "relative_max_distance", "embed_init",
                        "scale_residual_init", "num_classes", "use_bias", "fold_query_scale",
                        "attention_impl", "remat_policy", "scan_layers", "mlp_hidden_dropout")
ADDED_MOE_SETTINGS = ("capacity_dispatch", "dropless_exchange")


def test_a_first_day_runs_model_settings_build_todays_model_config():
  from bigjax.models import transformer
  from configs import lm_moe
  values = json.loads(lm_moe.get_config("runlocal").to_json_best_effort())
  for key in ADDED_MODEL_SETTINGS:
    del values["model"][key]
  for key in ADDED_MOE_SETTINGS:
    del values["model"]["moe"][key]
  model = transformer.TransformerConfig.from_dict(recorded_config.fill_older(values)["model"])
  # Tied logits were x . E^T / sqrt(emb_dim) then: what embed_init="unit" computes.
  assert model.embed_init == "unit" and not model.use_bias and not model.scan_layers
  assert model.mlp_hidden_dropout  # Every dense MLP dropped out its hidden activations then.


def test_the_config_of_a_step_is_the_one_that_trained_it(tmp_path):
  # Steps 1..10 trained with gelu (kept by a resume at 10 with relu), 11.. with relu.
  tmp_path = tmp_path / "sweep[lr=0.1]"  # A name that is a glob pattern of its own.
  tmp_path.mkdir()
  config = lm.get_config("runlocal")
  config.model.mlp_activation = "gelu"
  (tmp_path / "config.before_step_10.json").write_text(config.to_json_best_effort())
  config.model.mlp_activation = "relu"
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  read = lambda step: recorded_config.read(str(tmp_path), step)["model"]["mlp_activation"]
  assert [read(1), read(10), read(11), read(None)] == ["gelu", "gelu", "relu", "relu"]
