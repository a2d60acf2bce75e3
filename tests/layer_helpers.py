"""Helpers shared by the layer tests (tests/test_layers.py,
tests/test_attention_layer.py): a small LayerConfig and parameters as float64."""
import numpy as np

from bigjax.models import layers


def _cfg(**kw) -> layers.LayerConfig:
  args = dict(emb_dim=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=48,
              init_scale=0.3)
  return layers.LayerConfig(**{**args, **kw})


def _np(v) -> np.ndarray:
  return np.asarray(v[...], np.float64)
