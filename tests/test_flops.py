"""Model FLOPs per token (bigjax/flops.py) against XLA's count of the compiled step.

XLA counts every multiply-add of the unrolled train step; it computes the whole
causal score matrix (masking, not skipping, the upper half), so its count equals
ours plus the masked half of attention, up to the element-wise work (norms,
softmax, the optimizer), a few percent at these widths.
"""
import jax
import jax.numpy as jnp
from bigjax import flops, sharding, steps
from configs import lm, lm_moe


def test_training_flops_match_xla_count():
  config = lm.get_config("runlocal")
  config.update(batch_size=8, seq_len=128)
  config.model.update(num_layers=2, emb_dim=256, num_heads=4, mlp_dim=1024, max_len=128)
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  tokens = config.batch_size * config.seq_len
  batch = {k: jnp.ones((config.batch_size, config.seq_len), dt) for k, dt in
           (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}
  state = jax.eval_shape(lambda: steps.create_state(setup, 0))
  counted = steps.make_train_step(setup).lower(state, batch).compile().cost_analysis()["flops"]
  cfg = steps.model_config(config)
  ours = flops.training_flops_per_token(cfg, config.seq_len) * tokens
  masked_half = 6 * cfg.num_layers * config.seq_len * cfg.emb_dim * tokens
  assert abs(counted / (ours + masked_half) - 1) < 0.06, (counted, ours + masked_half)


def test_moe_layer_counts_router_and_k_experts():
  # XLA's count is no reference here: on CPU ragged_dot is emulated over all E
  # experts. Each token of a top-2 MoE layer passes through two experts' MLPs
  # (2 x emb x H each) and the router (emb x E), where a dense layer has one MLP.
  moe = steps.model_config(lm_moe.get_config())
  dense = moe.__class__(**{**moe.__dict__, "moe_every": 0})
  e, h, num_experts = moe.emb_dim, moe.mlp_dim, moe.moe.num_experts
  moe_layers = moe.num_layers // moe.moe_every
  extra = flops.training_flops_per_token(moe, 1024) - flops.training_flops_per_token(dense, 1024)
  assert moe.moe.k == 2 and extra == 6 * moe_layers * (2 * e * h + e * num_experts)
