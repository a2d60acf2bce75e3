"""Scanned block stacks (model.scan_layers) against the unrolled ones.

Weights are copied from the unrolled model into the scanned one through
`layer_layout.convert` (the scanned model starts from another seed, so nothing
agrees unless the copy and the scan are both right); losses, gradients, router
metrics, optimizer updates, decoded tokens and init_from restores must agree.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax import (checkpoint, decode, init_from, layer_layout, optim, sharding, steps,
                    tasks)
from bigjax.config import ConfigError
from bigjax.models import moe as moe_lib
from bigjax.models import transformer
from configs import lm

VOCAB = 64
TINY = dict(vocab_size=VOCAB, num_layers=4, emb_dim=32, num_heads=4, num_kv_heads=2,
            mlp_dim=64, max_len=24)
KINDS = {
    "decoder": dict(kind="decoder", position="rotary", num_layers=2),
    "encdec": dict(kind="encdec", num_layers=2, position="relative", relative_buckets=8,
                   relative_max_distance=12),
    "moe": dict(kind="decoder", moe_every=2, moe=moe_lib.MoEConfig(
        num_experts=4, router="gshard_top2", group_size=8)),
    "moe_dropless": dict(kind="decoder", moe_every=2, moe=moe_lib.MoEConfig(
        num_experts=4, router="dropless", top_k=2, dropless_impl="sorted_blocks",
        block_size=4)),
}


def _flat(tree) -> dict:
  return {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(like, flat: dict):
  return jax.tree_util.tree_map_with_path(lambda p, _: flat[optim.path_name(p)], like)


def _pair(**kw):
  """(unrolled model, scanned model holding the unrolled one's weights)."""
  cfg = transformer.TransformerConfig(**{**TINY, **kw})
  plain = transformer.build(cfg, nnx.Rngs(0))
  scanned = transformer.build(dataclasses.replace(cfg, scan_layers=True), nnx.Rngs(1))
  state = nnx.state(scanned, nnx.Param)
  params = nnx.to_pure_dict(state)
  assert any("/scanned/" in n for n in _flat(params))
  moved = layer_layout.convert(_flat(nnx.to_pure_dict(nnx.state(plain, nnx.Param))),
                               {n: np.shape(v) for n, v in _flat(params).items()})
  nnx.replace_by_pure_dict(state, _unflatten(params, moved))
  nnx.update(scanned, state)
  return plain, scanned


def _batch(kind, seed=0):
  rng = np.random.default_rng(seed)
  tokens = lambda: jnp.asarray(rng.integers(1, VOCAB, (4, 16)), jnp.int32)
  batch = {"targets": tokens(), "weights": jnp.ones((4, 16))}
  if kind == "encdec":
    return {**batch, "encoder_inputs": tokens(), "decoder_inputs": tokens()}
  return {**batch, "inputs": tokens()}


def _loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  task = tasks.get("reverse" if "encoder_inputs" in batch else "lm")

  def loss(p):
    sums = steps.loss_sums(task, nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(5),
                           (0.01, 0.001))
    return sums["loss_sum"] + sums.get("router_loss_sum", 0.0), sums.get("moe", {})

  (value, moe), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      nnx.to_pure_dict(params))
  return value, moe, _flat(grads)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_scanned_loss_and_gradients_equal_unrolled(name):
  kw = dict(KINDS[name], dropout_rate=0.1)  # Same dropout keys per block in both.
  plain, scanned = _pair(**kw)
  batch = _batch(kw["kind"])
  want, want_moe, want_grads = _loss_and_grads(plain, batch)
  got, got_moe, got_grads = _loss_and_grads(scanned, batch)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert set(got_moe) == set(want_moe)  # 'moe/decoder/blocks/1/aux_loss', ...
  for key in want_moe:
    np.testing.assert_allclose(got_moe[key], want_moe[key], rtol=1e-5, atol=1e-7, err_msg=key)
  got_grads = layer_layout.convert(got_grads, {n: g.shape for n, g in want_grads.items()})
  for n, g in want_grads.items():  # Float32 rounding of a different summation order.
    np.testing.assert_allclose(got_grads[n], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(),
                               err_msg=n)


def test_scanned_parameters_carry_a_layers_axis():
  _, scanned = _pair(**KINDS["moe"])
  names = {"/".join(map(str, p)): sharding.logical_axes_of(v)
           for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
  assert names["decoder/scanned/0/attn/query"] == ("layers", "embed", "heads", "kv")
  assert names["decoder/scanned/1/ffn/wi"] == ("layers", "exp", "embed", "mlp")
  assert names["embedder/tokens/embedding"] == ("vocab", "embed")
  rules = lm.get_config().sharding_rules
  assert sharding.logical_to_spec(("layers", "embed"), rules)[0] is None  # Unsharded.


@pytest.mark.parametrize("name", ["decoder", "encdec", "moe"])
def test_cached_decoding_gives_the_same_tokens(name):
  kw = dict(KINDS[name], init_scale=0.5)  # Logits far from ties.
  if name == "moe":  # Capacity = group size: nothing dropped (see test_decode).
    kw["moe"] = moe_lib.MoEConfig(num_experts=4, router="gshard_top2", group_size=4,
                                  eval_capacity_factor=2.0)
  plain, scanned = _pair(**kw)
  rng = np.random.default_rng(3)
  prompts = [list(map(int, rng.integers(3, VOCAB, n))) for n in (5, 9, 1)]
  for settings in (dict(), dict(beam_size=2, length_penalty=0.6)):
    want = decode.generate(plain, prompts, max_new_tokens=8, eos_id=None, **settings)
    assert decode.generate(scanned, prompts, max_new_tokens=8, eos_id=None,
                           **settings) == want
  assert len({tuple(w) for w in want}) == len(want)  # Not trivially constant.


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_update_and_freeze_regex_are_per_block_in_both_layouts(name):
  """Adafactor too: its factored moments and parameter scale are per block."""
  plain, scanned = _pair(**KINDS["moe"])
  cfg = lm.get_config().optim
  # eps well above float32 rounding of the gradients: Adam's first step is ~sign(g).
  cfg.update(name=name, lr=1e-2, warmup_steps=0, weight_decay=0.5, clip_norm=0.05, eps=1e-3,
             freeze="^decoder/blocks/(0|3)/|ffn_norm")
  batch = _batch("decoder")
  shapes = {n: np.shape(v) for n, v in _flat(nnx.to_pure_dict(
      nnx.state(plain, nnx.Param))).items()}
  updates = []
  for model in (plain, scanned):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = _unflatten(params, _loss_and_grads(model, batch)[2])
    tx = optim.make_optimizer(cfg, total_steps=10, stacked=optim.has_stacked(params))
    u, _ = tx.update(grads, tx.init(params), params)
    updates.append(layer_layout.convert(_flat(u), shapes))
  want, got = updates
  for n in shapes:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-5 * np.abs(want[n]).max(),
                               err_msg=n)
  frozen = [n for n in shapes if n.startswith(("decoder/blocks/0/", "decoder/blocks/3/"))
            or "ffn_norm" in n]
  assert frozen and all(not np.any(want[n]) for n in frozen)
  assert all(np.any(want[n]) for n in shapes if n not in frozen)


def _config(**model):
  config = lm.get_config("runlocal")
  config.model.update(vocab_size=260, num_layers=4, **model)
  return config


def _task_state(config):
  task = steps.make_setup(config, sharding.make_mesh(config.mesh))
  return task, steps.create_state(task, config.seed)


@pytest.mark.parametrize("source_scan", [False, True])
def test_init_from_converts_between_layouts(tmp_path, source_scan):
  source = _config(scan_layers=source_scan)
  task, state = _task_state(source)
  saver = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
  saver.save(3, state, force=True)
  saver.close()
  target = _config(scan_layers=not source_scan)
  target.seed = 7
  target.init_from.update(workdir=str(tmp_path), skip="blocks/2/attn/(key|query)$")
  target_task, fresh = _task_state(target)
  loaded, summary = init_from.load(target, target_task, fresh)
  src = layer_layout.per_block({n: np.shape(v) for n, v in _flat(state.params).items()})
  flat_src = _flat(jax.device_get(state.params))
  flat_fresh = _flat(jax.device_get(fresh.params))
  got = _flat(jax.device_get(loaded.params))
  where = layer_layout.per_block({n: np.shape(v) for n, v in got.items()})
  skipped = {"decoder/blocks/2/attn/key", "decoder/blocks/2/attn/query"}
  assert set(where) == set(src)
  for block, at in where.items():
    value = layer_layout.row_of(got, at)
    want = layer_layout.row_of(flat_fresh if block in skipped else flat_src,
                               at if block in skipped else src[block])
    np.testing.assert_array_equal(value, want, err_msg=block)
  assert "2 freshly initialised (decoder/blocks/2/attn/key, decoder/blocks/2/attn/query)" \
      in summary, summary
  for n, v in _flat(loaded.params).items():  # On this run's shardings.
    assert v.sharding == _flat(target_task.state_shardings.params)[n], n


def test_init_from_reads_each_block_from_its_own_layer_whatever_the_unit_size(tmp_path):
  """A scanned MoE source (moe_every=2: "scanned/0" stacks blocks 0 and 2) into a
  scanned dense model ("scanned/0" stacks blocks 0 and 1): the same name and shape,
  other blocks. Block 1 reads the source's block 1, not its block 2."""
  source = _config(scan_layers=True, moe_every=2)
  source.model.moe.update(num_experts=4, router="gshard_top2", group_size=8)
  _, state = _task_state(source)
  saver = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
  saver.save(3, state, force=True)
  saver.close()
  target = _config(scan_layers=True)
  target.model.num_layers = 2
  target.seed = 7
  target.init_from.update(workdir=str(tmp_path), skip="blocks/1/ffn/")  # The source's: MoE.
  target_task, fresh = _task_state(target)
  loaded, _ = init_from.load(target, target_task, fresh)
  flat_src, got = _flat(jax.device_get(state.params)), _flat(jax.device_get(loaded.params))
  assert np.shape(flat_src["decoder/scanned/0/attn/query"]) == np.shape(
      got["decoder/scanned/0/attn/query"])
  src = layer_layout.per_block({n: np.shape(v) for n, v in flat_src.items()})
  where = layer_layout.per_block({n: np.shape(v) for n, v in got.items()})
  flat_fresh = _flat(jax.device_get(fresh.params))
  for block, at in where.items():
    want = (layer_layout.row_of(flat_fresh, at) if "blocks/1/ffn/" in block
            else layer_layout.row_of(flat_src, src[block]))
    np.testing.assert_array_equal(layer_layout.row_of(got, at), want, err_msg=block)


def test_resuming_the_other_layout_names_the_setting(tmp_path):
  saved = {"params/decoder/blocks/0/attn/query": (8, 4, 2)}
  wanted = {"params/decoder/scanned/0/attn/query": (2, 8, 4, 2)}
  lines = checkpoint.describe_mismatch(saved, wanted)
  assert lines[0].startswith("the checkpoint was written with model.scan_layers=False and "
                             "this run has scan_layers=True"), lines


def test_scan_layers_config_is_validated():
  from bigjax import config as config_lib
  config = lm.get_config("runlocal")
  del config.model["scan_layers"]  # A string, past ConfigDict's type check (as JSON would).
  config.model.scan_layers = "yes"
  with pytest.raises(ConfigError, match=r"config.model.scan_layers: must be True or False"):
    config_lib.validate(config, num_devices=1)
  config = lm.get_config("runlocal")
  config.model.update(scan_layers=True, num_layers=3, moe_every=2)
  with pytest.raises(ConfigError, match=r"config.model.num_layers: 3 blocks do not split"):
    config_lib.validate(config, num_devices=1)
