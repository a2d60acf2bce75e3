"""Model FLOPs per token (bigjax/flops.py) against XLA's count of the compiled step.

XLA counts every multiply-add of the unrolled train step. With the causal
attention's block skipping off (attention.CAUSAL_BLOCKS = 1) it computes the whole
causal score matrix (masking, not skipping, the upper half), so its count equals
ours plus the masked half of each causal self-attention, up to the element-wise
work (norms, softmax, the optimizer), a few percent at these widths. A
bidirectional self-attention (an encoder's) and a cross-attention have no masked
half: XLA's count of them is ours.
"""
import jax
import jax.numpy as jnp
import pytest
from bigjax import flops, sharding, steps
from bigjax.models import attention
from configs import bert, lm, lm_moe, t5

# kind: (config module, the batch's token fields)
KINDS = {"decoder": (lm, ("inputs", "targets")),
         "encoder": (bert, ("inputs", "targets")),
         "classifier": (bert, ("inputs",)),
         "encdec": (t5, ("encoder_inputs", "decoder_inputs", "targets"))}


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_flops_match_xla_count(kind, monkeypatch):
  monkeypatch.setattr(attention, "CAUSAL_BLOCKS", 1)  # XLA computes whole score matrices.
  module, fields = KINDS[kind]
  config = module.get_config("direction,runlocal" if kind == "classifier" else "runlocal")
  config.update(batch_size=2, seq_len=512)
  # Narrow and long: attention is a third or more of the count, so counting an
  # encoder's attention as causal (half) is far outside the tolerance.
  config.model.update(num_layers=2, emb_dim=64, num_heads=4, mlp_dim=128, max_len=512,
                      dropout_rate=0.0)
  if kind == "encdec":  # Unequal stacks: the encoder's and decoder's terms are told apart.
    config.model.num_decoder_layers = 1
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  tokens = config.batch_size * config.seq_len
  batch = {k: jnp.ones((config.batch_size, config.seq_len), jnp.int32) for k in fields}
  batch["weights"] = jnp.ones((config.batch_size, config.seq_len), jnp.float32)
  if kind == "classifier":  # One label per row; no vocabulary projection.
    batch.update(targets=jnp.ones((config.batch_size,), jnp.int32),
                 weights=jnp.ones((config.batch_size,), jnp.float32))
  state = jax.eval_shape(lambda: steps.create_state(setup, 0))
  counted = steps.make_train_step(setup).lower(state, batch).compile().cost_analysis()["flops"]
  cfg = steps.model_config(config)
  assert cfg.kind == {"classifier": "encoder"}.get(kind, kind)
  ours = flops.training_flops_per_token(cfg, config.seq_len) * tokens
  # The causal self-attentions: a decoder's stack, an encoder-decoder's decoder stack.
  causal_layers = {"decoder": cfg.num_layers, "encoder": 0, "classifier": 0,
                   "encdec": cfg.num_decoder_layers}[kind]
  masked_half = 6 * causal_layers * config.seq_len * cfg.emb_dim * tokens
  assert abs(counted / (ours + masked_half) - 1) < 0.06, (counted, ours + masked_half)


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_moe_layer_counts_router_and_k_experts(kind):
  # XLA's count is no reference here: on CPU ragged_dot is emulated over all E
  # experts. Each token of a top-2 MoE layer passes through two experts' MLPs
  # (2 x emb x H each) and the router (emb x E), where a dense layer has one MLP.
  # An encoder-decoder has MoE layers in both stacks.
  moe = steps.model_config(lm_moe.get_config())
  moe = moe.__class__(**{**moe.__dict__, "kind": kind})
  dense = moe.__class__(**{**moe.__dict__, "moe_every": 0})
  e, h, num_experts = moe.emb_dim, moe.mlp_dim, moe.moe.num_experts
  moe_layers = moe.num_layers // moe.moe_every * (2 if kind == "encdec" else 1)
  extra = flops.training_flops_per_token(moe, 1024) - flops.training_flops_per_token(dense, 1024)
  assert moe.moe.k == 2 and extra == 6 * moe_layers * (2 * e * h + e * num_experts)


def test_peak_flops_by_device_kind():
  """jax's device_kind strings: a v5e says 'TPU v5 lite', a v5p plain 'TPU v5'."""
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("NVIDIA H100 NVL") == 835e12
  assert flops.peak_flops("cpu") is None


@pytest.mark.parametrize("router, factor", [("gshard_top2", 1.0), ("expert_choice", 1.0),
                                            ("expert_choice", 2.0),
                                            ("expert_choice", 16.0)])  # > E: every expert
def test_moe_flops_match_xla_count_with_gather_dispatch(router, factor):
  # With the gather dispatch XLA counts only the experts' real work: k experts per
  # token for top-k routing, capacity_factor on average for expert choice (each
  # expert takes capacity_factor·S/E of a group's S tokens).
  config = bert.get_config("runlocal")
  config.update(batch_size=2, seq_len=256)
  config.model.update(num_layers=2, emb_dim=64, num_heads=4, mlp_dim=512, max_len=256,
                      dropout_rate=0.0, moe_every=1)
  config.model.moe.update(router=router, capacity_factor=factor, group_size=256,
                          capacity_dispatch="gather", random_routing=False, num_experts=8)
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  shape = (config.batch_size, config.seq_len)
  batch = {"inputs": jnp.ones(shape, jnp.int32), "targets": jnp.ones(shape, jnp.int32),
           "weights": jnp.ones(shape, jnp.float32)}
  state = jax.eval_shape(lambda: steps.create_state(setup, 0))
  counted = steps.make_train_step(setup).lower(state, batch).compile().cost_analysis()["flops"]
  ours = flops.training_flops_per_token(steps.model_config(config), config.seq_len)
  assert abs(counted / (ours * shape[0] * shape[1]) - 1) < 0.1, (counted, ours)
