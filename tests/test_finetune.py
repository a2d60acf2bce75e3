"""Fine-tuning: config.init_from (partial restore) and optim.freeze (optax mask).

A small source run is trained once; each test starts new runs from it and checks
the parameters against the source checkpoint itself, read back independently.
"""
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax import (config as config_lib, decode, generate, init_from, metrics, optim,
                    sharding, steps, train)
from bigjax.data import pipeline, tokenizer
from configs import gpt2, mlp
from tests import checkpoint_damage

pytestmark = pytest.mark.slow
SOURCE_STEPS = 60


def _config(data_dir, **model):
  config = gpt2.get_config("runlocal")
  config.data.data_dir = data_dir
  config.total_steps = SOURCE_STEPS
  config.log_every = config.eval_every = config.checkpoint_every = SOURCE_STEPS
  config.model.dropout_rate = 0.0
  config.model.update(model)
  return config


def _checkpoint_params(workdir):
  """The parameters of a run's latest checkpoint, read with plain orbax."""
  manager = ocp.CheckpointManager(f"{workdir}/checkpoints",  # Plain orbax, unsharded.
                                  item_handlers=ocp.PyTreeCheckpointHandler(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  params = manager.restore(manager.latest_step())["params"]
  manager.close()
  return _flat(params)


def _flat(tree):
  return {optim.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  base = tmp_path_factory.mktemp("finetune")
  data_dir = str(base / "data")
  for split in ("train", "validation[:50%]", "validation[50%:]", "validation"):
    pipeline.token_array("stdlib_py", split, data_dir)
  workdir = str(base / "source")
  train.run(_config(data_dir), workdir)
  return {"base": base, "data_dir": data_dir, "workdir": workdir,
          "params": _checkpoint_params(workdir)}


def _fresh_and_loaded(config):
  mesh = sharding.make_mesh(config.mesh)
  setup = steps.make_setup(config, mesh)
  fresh = steps.create_state(setup, config.seed)
  loaded, summary = init_from.load(config, setup, steps.create_state(setup, config.seed))
  return _flat(fresh.params), _flat(loaded.params), summary


def test_untouched_weights_load_exactly_and_new_vocab_rows_keep_their_init(source):
  config = _config(source["data_dir"], vocab_size=512)  # 384 -> 512 rows.
  config.init_from.workdir = source["workdir"]
  fresh, loaded, summary = _fresh_and_loaded(config)
  src = source["params"]
  assert set(loaded) == set(src)
  table = "embedder/tokens/embedding"
  for name, value in loaded.items():
    if name == table:
      np.testing.assert_array_equal(value[:384], src[name])
      np.testing.assert_array_equal(value[384:], fresh[name][384:])
    else:
      np.testing.assert_array_equal(value, src[name], err_msg=name)
  assert "1 resized (embedder/tokens/embedding)" in summary, summary


def test_skip_reinitialises_and_new_parameters_start_fresh(source):
  config = _config(source["data_dir"], tie_embeddings=False)  # Adds an output head.
  config.init_from.workdir = source["workdir"]
  config.init_from.skip = "^decoder/final_norm/"
  fresh, loaded, summary = _fresh_and_loaded(config)
  new = set(loaded) - set(source["params"])
  assert new == {"embedder/logits_kernel"}, new
  for name, value in loaded.items():
    expect = fresh[name] if name in new or name.startswith("decoder/final_norm/") else (
        source["params"][name])
    np.testing.assert_array_equal(value, expect, err_msg=name)
  assert "3 freshly initialised" in summary, summary


def test_a_shallower_model_says_which_source_parameters_it_left_unused(source):
  """Fine-tuning a 1-block model from the 2-block source: the summary names what
  of the source had no place (block 1), so a dropped half is never silent."""
  config = _config(source["data_dir"], num_layers=1)
  config.init_from.workdir = source["workdir"]
  fresh, loaded, summary = _fresh_and_loaded(config)
  unused = sorted(n for n in source["params"] if n.startswith("decoder/blocks/1/"))
  assert unused and not set(unused) & set(loaded)
  assert f"; {len(unused)} of the source left unused ({', '.join(unused[:6])}, ... " \
      f"{len(unused) - 6} more)." in summary, summary


def test_frozen_parameters_never_change_under_another_optimizer(source):
  config = _config(source["data_dir"])
  config.init_from.workdir = source["workdir"]
  config.total_steps = 6
  config.log_every = config.eval_every = config.checkpoint_every = 3
  config.optim.update(name="lion", lr=1e-3, weight_decay=0.1, clip_norm=0.5,
                   freeze="^(embedder/|decoder/blocks/0/)")
  workdir = str(source["base"] / "frozen")
  result = train.run(config, workdir)
  after = _flat(result.state.params)
  frozen = [n for n in after if n.startswith(("embedder/", "decoder/blocks/0/"))]
  trained = [n for n in after if n not in frozen]
  assert frozen and trained
  for name in frozen:  # Bit for bit, despite weight decay and clipping.
    np.testing.assert_array_equal(after[name], source["params"][name], err_msg=name)
  for name in trained:
    assert not np.array_equal(after[name], source["params"][name]), name
  # No optimizer state is kept for frozen parameters.
  opt_leaves = sum(x.size for x in jax.tree.leaves(result.state.opt_state))
  trained_size = sum(after[n].size for n in trained)
  assert opt_leaves < trained_size + 100, (opt_leaves, trained_size)

  # Rerunning resumes the fine-tuned run's own checkpoint, not the source.
  config.total_steps = 9
  resumed = train.run(config, workdir)
  assert int(resumed.state.step) == 9
  resumed_params = _flat(resumed.state.params)
  for name in frozen:
    np.testing.assert_array_equal(resumed_params[name], source["params"][name])


def test_finetuning_on_held_out_files_beats_training_from_scratch(source):
  def run(name, init):
    config = gpt2.get_config("finetune,runlocal")
    config.data.data_dir = source["data_dir"]
    config.model.dropout_rate = 0.0
    config.init_from.workdir = init
    config.total_steps = 8
    config.log_every = config.eval_every = config.checkpoint_every = 8
    return train.run(config, str(source["base"] / name))

  tuned, scratch = run("tuned", source["workdir"]), run("scratch", "")
  losses = tuned.eval_metrics["eval_loss"], scratch.eval_metrics["eval_loss"]
  assert losses[0] < losses[1] - 0.5, losses
  # The fine-tuning run first evaluates the loaded parameters (its baseline, at
  # step 0). Whether a few steps on the first half of the held-out files then
  # help the second half depends on the source: they did for a source that had
  # barely learned, and do not for one that trains as it should (README).
  rows = metrics.read_jsonl(source["base"] / "tuned" / "metrics.jsonl")
  baseline = [r["eval_loss"] for r in rows if r["step"] == 0]
  assert len(baseline) == 1 and baseline[0] < losses[1] - 0.5, (baseline, losses)

  # Then generate from the fine-tuned run's workdir: the CLI's path (config.json
  # and a read-only restore) gives what the in-memory model gives.
  text = generate.run(str(source["base"] / "tuned"), "def ", max_new_tokens=12)
  ids = decode.generate(tuned.setup.model(tuned.state.params), [list(tokenizer.encode("def "))],
                        max_new_tokens=12, max_len=32, eos_id=tokenizer.EOS_ID)[0]
  assert text == tokenizer.decode(ids) and text


def test_incompatible_sources_fail_naming_the_parameter(source):
  config = _config(source["data_dir"], emb_dim=32, num_heads=2)
  config.init_from.workdir = source["workdir"]
  with pytest.raises(config_lib.ConfigError, match=r"parameter\(s\) have another shape .* "
                     "only vocab/classes dimensions may differ: decoder/.*init_from.skip") as e:
    _fresh_and_loaded(config)
  # Every one at once: the suggested skip re-initialises them all, and the rest load.
  config = _config(source["data_dir"], mlp_dim=2 * _config("").model.mlp_dim)
  config.init_from.workdir = source["workdir"]
  with pytest.raises(config_lib.ConfigError, match="parameter") as e:
    _fresh_and_loaded(config)
  config.init_from.skip = str(e.value).split("init_from.skip='")[1].rsplit("'", 1)[0]
  _, loaded, summary = _fresh_and_loaded(config)
  # A skip the run already had stays in the suggestion (it would be dropped otherwise).
  config.init_from.skip = "decoder/blocks/0/attn/"
  with pytest.raises(config_lib.ConfigError, match=r"init_from.skip='decoder/blocks/0/attn/\|"
                     r"\^\(decoder/blocks/0/ffn/wi"):
    _fresh_and_loaded(config)
  blocks = config.model.num_layers
  assert f"{3 * blocks} freshly initialised" in summary, summary  # wi, its bias, wo.
  # A model of another family shares no parameter path with the source.
  config = mlp.get_config("variant=deep")
  config.init_from.workdir = source["workdir"]
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh), example_shape=(8, 8, 1))
  with pytest.raises(config_lib.ConfigError, match="shares no parameter"):
    init_from.load(config, setup, steps.create_state(setup, 0))


@pytest.mark.parametrize("model, message", [
    (dict(mlp_activation="relu"), "model.mlp_activation is 'gelu' there, 'relu' here"),
    (dict(fold_query_scale=True), "model.fold_query_scale is False there, True here"),
    # Tied logits scaled by d ** -0.5: the source's trained logits would shrink.
    (dict(embed_init="unit"), "model.embed_init is 'normal' there, 'unit' here"),
    (dict(norm="rmsnorm"), "model.norm is 'layernorm' there, 'rmsnorm' here"),
    (dict(gated_mlp=True), "model.gated_mlp is False there, True here"),
    # The source's trained biases would be left out (added ones start at zero: allowed).
    (dict(use_bias=False), "model.use_bias is True there, False here"),
])
def test_a_model_that_computes_another_function_is_refused(source, model, message):
  """The same shapes, another function: the source's logits and loss would not
  carry over (the settings HF's from_pretrained takes from the checkpoint)."""
  config = _config(source["data_dir"], **model)
  config.init_from.workdir = source["workdir"]
  with pytest.raises(config_lib.ConfigError, match=(
      "config.init_from: this model would compute another function with the source's "
      f"parameters: {message}. Set --config.model.")):
    _fresh_and_loaded(config)


def test_bad_init_from_settings_are_config_errors(source, tmp_path):
  config = _config(source["data_dir"])
  config.init_from.workdir = str(tmp_path / "nothing")
  with pytest.raises(config_lib.ConfigError, match="has no checkpoints directory"):
    _fresh_and_loaded(config)
  config.init_from.workdir = source["workdir"]
  config.init_from.step = 7  # Not a saved step.
  with pytest.raises(config_lib.ConfigError, match="no finished checkpoint at step 7"):
    _fresh_and_loaded(config)
  config.init_from.step = -1
  with pytest.raises(config_lib.ConfigError, match="own --workdir"):
    config_lib.validate(config, num_devices=8, workdir=source["workdir"])
  config.optim.freeze = "^nothing_matches/"
  with pytest.raises(ValueError, match="matches no parameter"):
    _fresh_and_loaded(config)
  config.optim.freeze = "."
  with pytest.raises(ValueError, match="freezes every parameter"):
    _fresh_and_loaded(config)
  config.optim.freeze = ""
  config.init_from.skip = "decoder/blocks/0/mlp/"  # The block's FFN is ffn/, not mlp/.
  with pytest.raises(config_lib.ConfigError, match=r"init_from.skip: .* matches no parameter"):
    _fresh_and_loaded(config)


def test_a_damaged_source_checkpoint_is_never_loaded(source, tmp_path):
  """A flipped byte in the source, which orbax would read back silently, is a
  config error naming init_from, as it is damage on resume."""
  copy = tmp_path / "source"
  shutil.copytree(source["workdir"], copy)
  step_dir = copy / "checkpoints" / str(SOURCE_STEPS)
  checkpoint_damage.flip_byte(checkpoint_damage.largest_file(step_dir))
  config = _config(source["data_dir"])
  config.init_from.workdir = str(copy)
  with pytest.raises(config_lib.ConfigError, match=rf"init_from.workdir: its checkpoint at "
                     rf"step {SOURCE_STEPS} is damaged \(file .* other bytes"):
    _fresh_and_loaded(config)


def test_new_classification_head_and_batchnorm_statistics(tmp_path):
  """A digits MLP fine-tuned with two more classes: hidden layers and BatchNorm
  running averages load exactly; the head keeps the source's ten class columns and
  fresh ones for the two new classes."""
  source = mlp.get_config("variant=deep,runlocal")
  source.data.data_dir = str(tmp_path / "data")
  source.total_steps = source.checkpoint_every = 10
  result = train.run(source, str(tmp_path / "source"))
  src_params = _flat(result.state.params)
  src_stats = _flat(result.state.model_state)

  config = mlp.get_config("variant=deep,runlocal")
  config.model.num_outputs = 12
  config.init_from.workdir = str(tmp_path / "source")
  setup = steps.make_setup(config, sharding.make_mesh(config.mesh), example_shape=(8, 8, 1))
  fresh = steps.create_state(setup, 0)
  loaded, summary = init_from.load(config, setup, steps.create_state(setup, 0))
  params, stats = _flat(loaded.params), _flat(loaded.model_state)
  head_kernel, head_bias = "head/dense/kernel", "head/dense/bias"
  assert params[head_kernel].shape == (128, 12)
  np.testing.assert_array_equal(params[head_kernel][:, :10], src_params[head_kernel])
  np.testing.assert_array_equal(params[head_kernel][:, 10:],
                                _flat(fresh.params)[head_kernel][:, 10:])
  np.testing.assert_array_equal(params[head_bias][:10], src_params[head_bias])
  for name in params:
    if not name.startswith("head/"):
      np.testing.assert_array_equal(params[name], src_params[name], err_msg=name)
  assert stats.keys() == src_stats.keys() and stats
  for name in stats:
    np.testing.assert_array_equal(stats[name], src_stats[name], err_msg=name)
  assert "2 resized" in summary, summary


def test_top_k_is_compared_only_where_both_route_dropless(tmp_path):
  """GShard's and Switch's routers fix their own k: a top_k they ignore is no
  difference; the dropless router's is."""
  from bigjax import init_from
  from configs import lm_moe
  source = lm_moe.get_config("runlocal")
  here = lm_moe.get_config("runlocal")
  here.init_from.workdir = str(tmp_path)
  for router, refused in (("gshard_top2", False), ("dropless", True)):
    source.model.moe.update(router=router, top_k=2)
    here.model.moe.update(router=router, top_k=1)
    (tmp_path / "config.json").write_text(source.to_json())
    if refused:
      with pytest.raises(config_lib.ConfigError, match="model.moe.top_k is 2 there, 1 here"):
        init_from._check_same_function(here, step=1)
    else:
      init_from._check_same_function(here, step=1)
