"""A run's recorded WORKDIR/config.json, read by today's code: settings added
since the run was recorded take the value that run used."""
import json

from etils import epath

# Transformer settings added after runs were recorded, with the value those runs used.
SETTINGS_OLDER_RUNS_USED = {"norm_eps": 1e-6, "attention_impl": "xla",
                            # Before relative positions and classifier heads: none.
                            "relative_buckets": 32, "relative_max_distance": 128,
                            "num_classes": 0, "fold_query_scale": False,
                            # Tied logits were x . E^T * emb_dim ** -0.5 before
                            # 2026-11-28, as embed_init="unit" computes them.
                            "embed_init": "unit", "scale_residual_init": False,
                            "use_bias": False, "scan_layers": False, "remat_policy": "none",
                            # Every dense MLP dropped out its hidden activations.
                            "mlp_hidden_dropout": True}
# MoE settings likewise: GShard's einsums were the only capacity dispatch.
MOE_SETTINGS_OLDER_RUNS_USED = {"capacity_dispatch": "einsum", "dropless_exchange": "auto"}


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


def read(workdir: str, step: int | None = None) -> dict:
  """WORKDIR/config.json as a dict, older settings filled in; with `step`, the
  config that trained that step: a run resumed at S with changed settings kept
  the one of steps 1..S as config.before_step_S.json (bigjax.train), so it is the
  smallest such S >= step, else config.json. Raises OSError (missing,
  unreadable) or ValueError (not JSON)."""
  path = epath.Path(workdir) / "config.json"
  if step is not None:
    # Listed, not globbed: a workdir such as run[a] is a glob pattern of its own.
    kept = {int(p.name[len(KEPT_PREFIX):-len(".json")]): p
            for p in epath.Path(workdir).iterdir()
            if p.name.startswith(KEPT_PREFIX) and p.name.endswith(".json")
            and p.name[len(KEPT_PREFIX):-len(".json")].isdigit()}
    later = [s for s in kept if s >= step]
    path = kept[min(later)] if later else path
  return fill_older(json.loads(path.read_text()))


KEPT_PREFIX = "config.before_step_"  # + S + ".json": the config of steps 1..S.
