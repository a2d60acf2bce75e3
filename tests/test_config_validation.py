"""config.validate: every bad input is a ConfigError naming the field and the fix,
raised before anything is compiled (validate itself never touches a device)."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import pytest

from bigjax import checkpoint, config as config_lib, sharding, steps
from configs import bert, cnn, common, gpt2, linear_regression, lm, lm_moe, mlp, t5

FIX_WORDS = ("use", "choose", "set", "change", "raise", "lower", "make", "pick", "add",
             "start", "write", "fix", "remove", "declare")
# Whole words only: "use" must not match "because", nor "set" "settings".
FIX = re.compile(r"\b(" + "|".join(FIX_WORDS) + r")\b")


def _set(config, key, value):
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _delete(key):
  def make():
    c = lm.get_config("runlocal")  # Not locked: the CLI locks it after loading.
    del c[key]
    return c
  return make


def _retyped(module, arg, key, value):
  """A maker of `module.get_config(arg)` whose (dotted) key holds a value of another
  type, past ConfigDict's type check (as a hand-edited config.json would)."""
  def make():
    c = _without(module, arg, key)()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
    return c
  return make


def _without(module, arg, key):
  """A maker of `module.get_config(arg)` without the (dotted) key."""
  def make():
    c = module.get_config(arg)
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    del node[leaf]
    return c
  return make


def _config(module, arg, **overrides):
  """A maker of `module.get_config(arg)` with overrides ('a__b' or 'a.b' keys)."""
  def make():
    c = module.get_config(arg)
    for k, v in overrides.items():
      _set(c, k.replace("__", "."), v)
    return c
  return make


_with = functools.partial(_config, lm, "runlocal")
_moe = functools.partial(_config, lm_moe, "runlocal")
_zoo = functools.partial(_config, mlp, "variant=deep")


# (make config, field named in the error, num_devices, process_count)
CASES = [
    # Sizes: zero, negative.
    (_with(total_steps=0), "total_steps"),
    (_with(total_steps=-5), "total_steps"),
    (_with(log_every=0), "log_every"),
    (_with(eval_every=0), "eval_every"),
    (_with(checkpoint_every=-1), "checkpoint_every"),
    (_with(batch_size=0), "batch_size"),
    (_with(seq_len=0), "seq_len"),
    (_with(seq_len=-32), "seq_len"),
    (_with(grad_accum_steps=0), "grad_accum_steps"),
    (_with(keep_checkpoints=0), "keep_checkpoints"),
    (_with(eval_batches=0), "eval_batches"),
    (_with(sample_tokens=-1), "sample_tokens"),
    (_with(model__vocab_size=0), "model.vocab_size"),
    (_with(model__num_layers=0), "model.num_layers"),
    (_with(model__emb_dim=-64), "model.emb_dim"),
    (_with(model__num_heads=0), "model.num_heads"),
    (_with(model__mlp_dim=0), "model.mlp_dim"),
    (_with(model__max_len=0), "model.max_len"),
    (_with(model__num_kv_heads=-1), "model.num_kv_heads"),
    (_with(model__head_dim=-8), "model.head_dim"),
    (_with(model__num_decoder_layers=-1), "model.num_decoder_layers"),
    (_with(model__init_scale=0.0), "model.init_scale"),
    (_with(model__norm_eps=0.0), "model.norm_eps"),
    (_with(model__attention_impl="flash"), "model.attention_impl"),
    (_with(optim__warmup_steps=-1), "optim.warmup_steps"),
    (_with(optim__lr=0.0), "optim.lr"),
    (_with(optim__lr=-1e-3), "optim.lr"),
    # Names.
    (_with(model__kind="gpt"), "model.kind"),
    (_with(model__mlp_activation="swish2"), "model.mlp_activation"),
    (_with(model__norm="batchnorm"), "model.norm"),
    (_with(model__init="zeros"), "model.init"),
    (_with(model__position="alibi"), "model.position"),
    (_with(model__dtype="float64"), "model.dtype"),
    (_with(model__param_dtype="int8"), "model.param_dtype"),
    (_with(optim__name="adamax"), "optim.name"),
    (_with(optim__schedule="step"), "optim.schedule"),
    (_with(optim__nan_policy="ignore"), "optim.nan_policy"),
    (_with(data__dataset=""), "data.dataset"),
    (_with(data__train_split=""), "data.train_split"),
    (_with(data__eval_split=" "), "data.eval_split"),
    (_with(data__text_key=""), "data.text_key"),
    (_moe(**{"model.moe.router": "hash"}), "model.moe.router"),
    (_moe(**{"model.moe.dropless_impl": "magic"}), "model.moe.dropless_impl"),
    (_moe(**{"model.moe.capacity_dispatch": "scatter"}), "model.moe.capacity_dispatch"),
    # Shapes that do not fit together.
    (_with(model__num_heads=3), "model.num_heads"),  # 3 heads do not divide emb_dim 64.
    (_with(model__num_kv_heads=3), "model.num_kv_heads"),
    (_with(model__emb_dim=60, model__position="rotary"), "model.head_dim"),  # odd head_dim
    (_with(model__position="relative", model__relative_buckets=7), "model.relative_buckets"),
    (_with(model__position="relative", model__relative_buckets=2), "model.relative_buckets"),
    (_with(model__position="relative", model__relative_max_distance=16),
     "model.relative_max_distance"),  # Not past the 16 exact offsets of 32 buckets.
    (_with(model__position="relative", model__attention_impl="cudnn"),
     "model.attention_impl"),
    (_with(seq_len=64), "seq_len"),  # longer than the position table (max_len 32)
    (_with(model__vocab_size=100), "model.vocab_size"),  # fewer ids than the tokenizer
    (_with(model__dropout_rate=1.0), "model.dropout_rate"),
    (_with(model__dropout_rate=-0.1), "model.dropout_rate"),
    # Optimizer values.
    (_with(optim__clip_norm=-1.0), "optim.clip_norm"),
    (_with(optim__clip_norm=None), "optim.clip_norm"),  # A Python config's None
    (_with(optim__weight_decay=None), "optim.weight_decay"),
    (_with(optim__weight_decay=float("nan")), "optim.weight_decay"),  # NaN < 0 is False.
    (_with(optim__clip_value=-0.5), "optim.clip_value"),
    (_with(optim__weight_decay=-0.1), "optim.weight_decay"),
    (_with(optim__b1=1.0), "optim.b1"),
    (_with(optim__b2=1.5), "optim.b2"),
    (_with(optim__eps=-1e-8), "optim.eps"),
    # Adam(W) divides by sqrt(v) + eps: 0/0 = NaN where a gradient is always zero.
    (_with(optim__eps=0.0), "optim.eps"),
    (_with(optim__name="adam", optim__weight_decay=0.0, optim__eps=0.0), "optim.eps"),
    # lm's weight_decay=0.1 would be ignored by optimizers without weight decay.
    (_with(optim__name="adam"), "optim.weight_decay"),
    (_with(optim__name="sgd"), "optim.weight_decay"),
    (_with(optim__name="momentum"), "optim.weight_decay"),
    (_with(optim__name="nesterov"), "optim.weight_decay"),
    (_with(optim__end_lr_factor=-0.5), "optim.end_lr_factor"),
    (_with(optim__end_lr_factor=2.0), "optim.end_lr_factor"),
    # Mesh vs devices.
    (_with(mesh__data=3), "mesh"),  # 3 × 1 × 1 × 1 is not 8
    (_with(mesh__data=2, mesh__fsdp=2), "mesh"),  # 4 is not 8 and no -1
    (_with(mesh__data=-1, mesh__fsdp=-1), "mesh"),  # two -1
    (_with(mesh__fsdp=0), "mesh.fsdp"),
    (_with(mesh__tensor=-2), "mesh.tensor"),
    (_with(mesh__tensor=3), "mesh"),  # 3 does not divide 8
    (_with(mesh__data=16), "mesh"),  # more than there are devices
    # Batch vs data parallelism, processes.
    (_with(batch_size=4), "batch_size"),  # 4 rows over 8 data-parallel devices
    (_with(batch_size=12, grad_accum_steps=5), "batch_size"),
    (_with(batch_size=8, grad_accum_steps=2), "batch_size"),  # microbatch 4 < 8 devices
    (_with(batch_size=8, mesh__data=1), "batch_size", 1, 3),  # 8 rows, 3 processes
    # Tensor / fsdp / expert parallel sizes vs model dims.
    (_with(mesh__data=1, mesh__tensor=8), "model.num_heads"),  # 4 heads over tensor=8
    (_with(mesh__data=-1, mesh__tensor=2, model__mlp_dim=130, model__vocab_size=384,
           model__num_kv_heads=1), "model.num_kv_heads"),
    (_with(mesh__data=-1, mesh__tensor=2, model__mlp_dim=129), "model.mlp_dim"),
    (_with(mesh__data=-1, mesh__tensor=2, model__vocab_size=385), "model.vocab_size"),
    (_with(mesh__data=1, mesh__fsdp=8, model__emb_dim=60, model__num_heads=4), "model.emb_dim"),
    (_moe(**{"mesh.data": -1, "mesh.expert": 4, "model.moe.num_experts": 6}),
     "model.moe.num_experts"),
    # MoE.
    (_moe(**{"model.moe_every": -1}), "model.moe_every"),
    (_moe(**{"model.moe_every": 3}), "model.moe_every"),  # 2 blocks: none would be MoE
    (_config(lm_moe, "runlocal,encdec", model__num_decoder_layers=1), "model.moe_every"),
    (_moe(**{"model.moe.num_experts": 0}), "model.moe.num_experts"),
    (_moe(**{"model.moe.capacity_factor": 0.0}), "model.moe.capacity_factor"),
    (_moe(**{"model.moe.capacity_factor": -1.0}), "model.moe.capacity_factor"),
    (_moe(**{"model.moe.eval_capacity_factor": 0.0}), "model.moe.eval_capacity_factor"),
    (_moe(**{"model.moe.router": "dropless", "model.moe.top_k": 3,
             "model.moe.num_experts": 2}), "model.moe.top_k"),  # top-k > experts
    (_moe(**{"model.moe.num_experts": 1}), "model.moe.num_experts"),  # top-2 of 1 expert
    (_moe(**{"model.moe.capacity_factor": float("inf")}), "model.moe.capacity_factor"),
    (_moe(**{"model.moe.eval_capacity_factor": None}), "model.moe.eval_capacity_factor"),
    (_moe(**{"model.moe.aux_loss_weight": float("nan")}), "model.moe.aux_loss_weight"),
    (_moe(**{"model.moe.z_loss_weight": float("inf")}), "model.moe.z_loss_weight"),
    (_moe(**{"model.moe.jitter_noise": None}), "model.moe.jitter_noise"),
    (_moe(**{"model.moe.router": "expert_choice"}), "model.moe.router"),  # decoder
    (_moe(**{"model.moe.group_size": 24}), "model.moe.group_size"),  # 24 ∤ seq_len 32
    (_moe(**{"model.moe.group_size": 0}), "model.moe.group_size"),
    (_moe(**{"model.moe.block_size": 0}), "model.moe.block_size"),
    (_moe(**{"model.moe.jitter_noise": 1.0}), "model.moe.jitter_noise"),
    (_moe(**{"model.moe.aux_loss_weight": -0.01}), "model.moe.aux_loss_weight"),
    (_moe(**{"model.moe.z_loss_weight": -1.0}), "model.moe.z_loss_weight"),
    # Structure.
    (_delete("seed"), "seed"),
    (_delete("grad_accum_steps"), "grad_accum_steps"),
    (_delete("sample_tokens"), "sample_tokens"),
    (_delete("async_checkpoint"), "async_checkpoint"),
    (_with(sample_tokens=-1), "sample_tokens"),
    (_with(sharding_rules=[["vocab", "tensor"], ["embed", "fsdp"]]), "sharding_rules"),
    (_with(sharding_rules=[["batch", ["data", "model"]]]), "sharding_rules[0]"),
    (_with(sharding_rules=[["batch"]]), "sharding_rules[0]"),
    # Every setting is read from the config, strictly: a missing key is not filled in
    # with a second default, and an unknown (misspelt) one is not ignored.
    (_with(model__dropout=0.1), "model.dropout"),
    (_moe(**{"model.moe.topk": 2}), "model.moe.topk"),
    (_zoo(model__hidden=(8,)), "model.hidden"),
    (_without(lm, "runlocal", "model.remat_policy"), "model.remat_policy"),
    (_without(lm_moe, "runlocal", "model.moe.block_size"), "model.moe.block_size"),
    (_without(mlp, "variant=deep", "model.batch_norm"), "model.batch_norm"),
    (_without(bert, "runlocal", "data.mask_rate"), "data.mask_rate"),
    (_without(mlp, "variant=deep", "data.standardize"), "data.standardize"),
    (_without(lm, "runlocal", "optim.nan_policy"), "optim.nan_policy"),
    (_without(lm, "runlocal", "optim.freeze"), "optim.freeze"),
    (_without(lm, "runlocal", "optim.eps"), "optim.eps"),
    (_without(lm, "runlocal", "init_from"), "init_from"),
    (_without(lm, "runlocal", "init_from.skip"), "init_from.skip"),
    (_with(mesh__pipeline=2), "mesh.pipeline"),
    (_without(lm, "runlocal", "mesh.tensor"), "mesh.tensor"),
    (_without(lm, "runlocal", "mesh_axes"), "mesh_axes"),
    (_with(mesh_axes=("data", "data")), "mesh_axes"),
    # Tasks and the model kinds that train on them.
    (_with(task="translate"), "task"),
    (_with(task="mlm"), "model.kind"),  # a decoder cannot do masked-LM
    (_with(task="classify"), "model.kind"),
    (_zoo(task="lm"), "model.kind"),
    (_zoo(model__kind="resnet"), "model.kind"),
    (_config(bert, "runlocal", model__vocab_size=259), "model.vocab_size"),  # no [MASK] id
    (_config(bert, "runlocal", data__mask_rate=1.0), "data.mask_rate"),
    (_with(model__num_classes=2), "model.num_classes"),  # a decoder has no classifier
    (_config(bert, "direction,runlocal", model__num_classes=3), "model.num_classes"),
    (_config(bert, "direction,runlocal", model__num_classes=-1), "model.num_classes"),
    (_with(task="direction"), "model.kind"),
    # Zoo models.
    (_zoo(model__num_outputs=0), "model.num_outputs"),
    (_zoo(model__hidden_dims=(64, 0)), "model.hidden_dims"),
    (_zoo(model__activation="tanh2"), "model.activation"),
    (_zoo(model__init="orthogonal"), "model.init"),
    (_zoo(model__init="zeros"), "model.init"),  # Dead hidden layers: no gradient reaches them.
    (_zoo(model__dropout_rate=1.0), "model.dropout_rate"),
    (_zoo(model__dtype="bfloat61"), "model.dtype"),
    (_zoo(model__param_dtype="float16"), "model.param_dtype"),
    (_config(mlp, "variant=binary", model__num_outputs=2), "model.num_outputs"),
    (_config(linear_regression, "", model__hidden_dims=(8,)), "model.hidden_dims"),
    (_zoo(data__feature_key=""), "data.feature_key"),
    (_zoo(mesh__data=1, mesh__tensor=8, model__hidden_dims=(100,)), "model.hidden_dims"),
    # Fine-tuning.
    (_with(init_from__step=-2), "init_from.step"),
    (_with(init_from__workdir=None), "init_from.workdir"),
    (_with(data__data_dir=None), "data.data_dir"),
    (_with(loss_chunk_len=5), "loss_chunk_len"),  # 5 does not divide seq_len 32
    (_with(profile_steps=(5, 3)), "profile_steps"),  # start must come before stop
    (_with(model__num_layers=3, model__moe_every=2, model__scan_layers=True),
     "model.num_layers"),  # 3 blocks do not split into scanned pairs
    (_moe(**{"model.moe.dropless_exchange": "fast"}), "model.moe.dropless_exchange"),
    (_retyped(lm, "runlocal", "model.scan_layers", "yes"), "model.scan_layers"),
    (_with(init_from__skip="(unclosed"), "init_from.skip"),
    (_with(optim__freeze="[bad"), "optim.freeze"),
]
CASES = [c if len(c) == 4 else (*c, 8, 1) for c in CASES]


@pytest.mark.parametrize("make, field, num_devices, process_count", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_bad_config_names_field_and_fix(make, field, num_devices, process_count):
  config = make()
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, num_devices=num_devices, process_count=process_count)
  msg = str(e.value)
  assert re.search(rf"config\.{re.escape(field)}(?![\w.])", msg), msg
  assert FIX.search(msg.lower()), f"no fix in: {msg}"


def test_fix_words_match_whole_words_only():
  assert not FIX.search("it failed because the settings are unusable.")
  assert FIX.search("set it to 1.") and FIX.search("use e.g. 0.1.")


def test_every_field_that_validate_names_has_a_case():
  # Each check in config.py that names its field literally is exercised above.
  with open(config_lib.__file__) as f:
    named = set(re.findall(r'_fail\(\s*"([^"]+)"', f.read()))
  assert len(named) > 30
  assert named <= {c[1] for c in CASES}, sorted(named - {c[1] for c in CASES})


def test_good_configs_pass():
  for config, n in ((lm.get_config("runlocal"), 8), (lm.get_config("runlocal"), 1),
                    (lm.get_config("demo"), 8), (lm.get_config(), 8),
                    (lm_moe.get_config("runlocal"), 8), (lm_moe.get_config("runlocal,encdec"), 8),
                    # (gpt2's baby recipe, batch 12, is for one device.)
                    *((c, n) for c in _every_zoo_config()
                      for n in ((8, 1) if c.batch_size % 8 == 0 else (1,)))):
    config_lib.validate(config, num_devices=n)


def test_expert_choice_counts_one_choice_per_token_in_validation_as_in_the_layer():
  # Expert choice takes C = ceil(capacity_factor·S/E) tokens per expert: k = 1 for the
  # capacity, in the layer and in validation alike, so one expert is enough.
  config = bert.get_config("runlocal")
  config.model.moe_every = 1
  config.model.moe.update(router="expert_choice", num_experts=1, top_k=2, group_size=32)
  config_lib.validate(config, num_devices=8)
  moe_cfg = steps.model_config(config).moe
  assert moe_cfg.k == 1
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.moe\.num_experts"):
    config.model.moe.router = "gshard_top2"  # Two distinct experts per token: not with one.
    config_lib.validate(config, num_devices=8)


def test_a_new_mesh_axis_is_a_config_and_rules_change():
  config = lm.get_config("runlocal")
  config.mesh_axes = ("data", "expert", "fsdp", "sequence", "tensor")
  config.mesh.sequence = 2
  config.sharding_rules = [["activation_length", "sequence"]] + [
      r for r in config.sharding_rules if r[0] != "activation_length"]
  config_lib.validate(config, num_devices=8)
  mesh = sharding.config_mesh(config)
  assert dict(mesh.shape) == dict(data=4, expert=1, fsdp=1, sequence=2, tensor=1)
  spec = sharding.named_sharding(
      mesh, ("activation_batch", "activation_length", "activation_embed"),
      [tuple(r) for r in config.sharding_rules]).spec
  assert spec == jax.P(("data", "expert", "fsdp"), "sequence", None)


def test_eps_and_weight_decay_bind_only_the_optimizers_that_read_them():
  for name, eps, wd in (("sgd", 0.0, 0.0), ("momentum", 0.0, 0.0), ("lion", 0.0, 0.1),
                        ("adafactor", 0.0, 0.1), ("adamw", 1e-8, 0.1), ("adam", 1e-8, 0.0)):
    config = lm.get_config("runlocal")
    config.optim.update(name=name, eps=eps, weight_decay=wd)
    config_lib.validate(config, num_devices=8)


def _without_axis(config, axis):
  """`config` with `axis` left out of mesh_axes, mesh and sharding_rules."""
  config.mesh_axes = tuple(a for a in config.mesh_axes if a != axis)
  del config.mesh[axis]
  rules = []
  for name, axes in config.sharding_rules:
    axes = [a for a in ([axes] if isinstance(axes, str) else axes or []) if a != axis]
    rules.append([name, axes or None])
  config.sharding_rules = rules
  return config


@pytest.mark.parametrize("axis", ["tensor", "fsdp", "expert"])
def test_a_mesh_may_leave_out_an_axis(axis):
  # An axis config.mesh_axes does not declare shards nothing: it counts as size 1
  # (the model-dimension checks used to index it, a bare KeyError).
  for config in (lm_moe.get_config("runlocal"), mlp.get_config("variant=deep")):
    config = _without_axis(config, axis)
    config_lib.validate(config, num_devices=8)
    assert axis not in sharding.config_mesh(config).shape
  # From the command line a key cannot be deleted: size 1 leaves it out as well.
  config = _without_axis(lm_moe.get_config("runlocal"), axis)
  with config.unlocked():
    config.mesh[axis] = 1
  config_lib.validate(config, num_devices=8)
  assert axis not in sharding.config_mesh(config).shape
  with config.unlocked():
    config.mesh[axis] = 2  # A size > 1 for an axis that is not declared is refused.
  with pytest.raises(config_lib.ConfigError, match=rf"config\.mesh\.{axis}: is not a mesh"):
    config_lib.validate(config, num_devices=8)
  # The axes that are there are still checked.
  config = _without_axis(lm.get_config("runlocal"), axis)
  if axis == "tensor":  # 60 does not split over fsdp=8.
    config.mesh.update(dict(data=1, fsdp=8))
    config.model.emb_dim, field = 60, "model.emb_dim"
  else:  # 4 heads do not split over tensor=8.
    config.mesh.update(dict(data=1, tensor=8))
    field = "model.num_heads"
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{field}\b"):
    config_lib.validate(config, num_devices=8)


def _every_zoo_config():
  """Every variant a docstring or the README names."""
  for module, args in ((mlp, ("variant=binary", "variant=deep", "variant=deep,runlocal")),
                       (cnn, ("", "mnist", "runlocal")), (linear_regression, ("", "runlocal")),
                       (gpt2, ("", "runlocal", "demo", "baby", "finetune,runlocal",
                               "finetune,demo")),
                       (t5, ("", "runlocal", "demo")),
                       (bert, ("", "runlocal", "demo", "direction", "direction,runlocal",
                               "direction,demo")),
                       (lm_moe, ("", "demo", "runlocal,encdec", "demo,encdec"))):
    for arg in args:
      yield module.get_config(arg)


# Workdir.

def test_workdir_under_a_file(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(config_lib.ConfigError, match="workdir.*is a file"):
    config_lib.validate(lm.get_config("runlocal"), num_devices=8,
                        workdir=str(tmp_path / "f" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_workdir_without_permission(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir(mode=0o500)
  with pytest.raises(config_lib.ConfigError, match="not writable"):
    config_lib.validate(lm.get_config("runlocal"), num_devices=8, workdir=str(ro / "run"))


def test_workdir_without_permission_simulated(tmp_path, monkeypatch):
  # Runs even as root: what matters is that a denied access is reported as such.
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                      else real(p, mode))
  with pytest.raises(config_lib.ConfigError,
                     match=rf"--workdir=.*{re.escape(str(tmp_path))} is not writable"):
    config_lib.validate(lm.get_config("runlocal"), num_devices=8,
                        workdir=str(tmp_path / "a" / "b"))


def test_empty_workdir():
  with pytest.raises(config_lib.ConfigError, match="--workdir is empty"):
    config_lib.validate(lm.get_config("runlocal"), num_devices=8, workdir="")


# A checkpoint written by another model.

def test_checkpoint_of_a_different_model_names_the_mismatch(tmp_path):
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  small = lm.get_config("runlocal")
  small.model.update(emb_dim=32, num_layers=1)
  setup_small = steps.make_setup(small, mesh)
  # Arrays of the right structure and shapes; no compile needed to write them.
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), setup_small.abstract_state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1)
  ckpt.save(1, state)
  ckpt.close()
  setup = steps.make_setup(lm.get_config("runlocal"), mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpt.restore(setup.abstract_state, setup.state_shardings)
  ckpt.close()
  msg = str(e.value)
  assert "checkpoint at step 1" in msg and "different model" in msg
  assert re.search(r"params/decoder/blocks/1/\S+: in this run .*, not in the checkpoint", msg)
  assert re.search(r"params/\S+: shape \([^)]*\b32\b[^)]*\) in the checkpoint, "
                   r"\([^)]*\b64\b[^)]*\) in this run", msg)
  assert "new --workdir" in msg
  assert isinstance(e.value, config_lib.ConfigError)


def test_mesh_divisibility_follows_the_sharding_rules_not_fixed_axis_names():
  # A vocabulary the rules keep whole need not divide the tensor size...
  config = lm.get_config("runlocal")
  config.mesh.update(dict(data=-1, tensor=2))
  config.model.vocab_size = 385
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.vocab_size: 385 does not "
                     r"split over mesh\.tensor=2"):
    config_lib.validate(config, num_devices=8)
  config.sharding_rules = [[n, None if n in ("vocab", "activation_vocab") else a]
                           for n, a in config.sharding_rules]
  config_lib.validate(config, num_devices=8)
  # ...and an mlp the rules send over fsdp must divide it.
  config = lm.get_config("runlocal")
  config.mesh.update(dict(data=1, fsdp=8))
  config.model.mlp_dim = 132
  config.sharding_rules = [[n, "fsdp" if n == "mlp" else a] for n, a in config.sharding_rules]
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.mlp_dim: 132 does not "
                     r"split over mesh\.fsdp=8"):
    config_lib.validate(config, num_devices=8)


def test_the_model_dataclasses_defaults_are_the_config_files_defaults():
  # Code that builds MoEConfig() or ZooConfig() directly (tests, notebooks,
  # benchmarks) gets the settings a run's config would have.
  from bigjax.models import moe, zoo
  assert moe.MoEConfig() == moe.MoEConfig.from_dict(common.moe_config())
  assert zoo.ZooConfig() == zoo.ZooConfig.from_dict(common.zoo_model("mlp"))
