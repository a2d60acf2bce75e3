"""A run's recorded WORKDIR/config.json, read by today's code: settings added
since the run was recorded take the value that run used."""
import json

from etils import epath

# Transformer settings added after runs were recorded, with the value those runs used.
SETTINGS_OLDER_RUNS_USED = {"norm_eps": 1e-6, "attention_impl": "xla",
                            # Before relative positions and classifier heads: none.
                            "relative_buckets": 32, "relative_max_distance": 128,
                            "num_classes": 0, "fold_query_scale": False}
# MoE settings likewise: GShard's einsums were the only capacity dispatch.
MOE_SETTINGS_OLDER_RUNS_USED = {"capacity_dispatch": "einsum"}


def fill_older(values: dict) -> dict:
  """`values` (a config as a JSON dict) with the settings it predates filled in."""
  model = values.get("model")
  if isinstance(model, dict) and "norm" in model:  # A Transformer's settings.
    for key, value in SETTINGS_OLDER_RUNS_USED.items():
      model.setdefault(key, value)
    if isinstance(model.get("moe"), dict):
      for key, value in MOE_SETTINGS_OLDER_RUNS_USED.items():
        model["moe"].setdefault(key, value)
  return values


def read(workdir: str) -> dict:
  """WORKDIR/config.json as a dict, older settings filled in. Raises OSError
  (missing, unreadable) or ValueError (not JSON)."""
  return fill_older(json.loads((epath.Path(workdir) / "config.json").read_text()))
