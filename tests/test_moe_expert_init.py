"""Each expert's kernels start as the dense MLP's do, whatever the number of experts.

The reference is the dense MLP of the same width (layers.MLP): an expert is one
such MLP, so its kernels' spread must not depend on how many experts sit beside
it in the stacked [experts, in, out] array.
"""
import numpy as np
import pytest
from flax import nnx

from bigjax.models import layers, moe as moe_lib


@pytest.mark.parametrize("init", ["lecun", "xavier", "normal"])
@pytest.mark.parametrize("num_experts", [1, 8, 32])
def test_expert_kernels_have_the_dense_mlps_spread(init, num_experts):
  cfg = layers.LayerConfig(emb_dim=128, num_heads=4, num_kv_heads=4, head_dim=32,
                           mlp_dim=512, init=init, residual_init_scale=0.5, gated_mlp=True,
                           mlp_activation="silu")
  dense = layers.MLP(cfg, rngs=nnx.Rngs(0))
  experts = moe_lib.MoEFeedForward(cfg, moe_lib.MoEConfig(num_experts=num_experts),
                                   rngs=nnx.Rngs(1))
  for name in ("wi", "wi_gate", "wo"):
    want = np.std(np.asarray(getattr(dense, name)[...]))
    got = np.std(np.asarray(getattr(experts, name)[...]), axis=(1, 2))  # Per expert.
    np.testing.assert_allclose(got, want, rtol=0.06, err_msg=name)
