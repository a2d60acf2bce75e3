"""bigjax's GPT-2, Llama, Mixtral, T5 and Switch models compute what HF transformers' do.

An implementation bigjax did not write: the same weights (every one random,
biases included, not the zeros or ones of an initialisation) copied into HF's
GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM / T5ForConditionalGeneration
/ SwitchTransformersForConditionalGeneration must give the same logits and
gradients, and the same training curve under the same optimizer. Needs the
benchmark extra (`pip install -e '.[bench]'`: torch, transformers); skipped
without it. experiments/benchmarks/peer.py prints the same check at full size.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bigjax import beam_search, decode, loop, sharding, steps  # noqa: E402
from bigjax.models import attention, relative_position, routing, transformer  # noqa: E402
from configs import gpt2, t5  # noqa: E402

from experiments.benchmarks import hf_models  # noqa: E402


LENGTH = 128


def _tiny_config(arch):
  config = gpt2.get_config("runlocal")
  # 128 tokens: a causal self-attention scored in row blocks (attention.CAUSAL_BLOCKS).
  config.model.update(num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, max_len=LENGTH,
                      vocab_size=64, dropout_rate=0.0, dtype="float32")
  if arch in ("mixtral", "llama"):
    config = hf_models.mixtral_like(config)
  if arch == "llama":  # Dense, with 2 key/value heads for 4 query heads.
    config.model.update(moe_every=0, num_kv_heads=2)
  return config


def _tiny_t5_config(tie_embeddings):
  config = t5.get_config()
  # 8 buckets up to distance 20 over 128 tokens: exact, logarithmic and saturated
  # buckets all occur. A decoder deeper than the encoder, as T5 allows.
  config.model.update(num_layers=2, num_decoder_layers=3, emb_dim=32, num_heads=4,
                      mlp_dim=64, max_len=LENGTH, vocab_size=64, dropout_rate=0.0,
                      dtype="float32", relative_buckets=8, relative_max_distance=20,
                      tie_embeddings=tie_embeddings, scan_layers=False)
  assert config.model.position == "relative"
  return config


def _tiny_switch_config():
  """A Switch Transformer: T5 with a ReLU MLP and a top-1 MoE in every second block,
  routed per sequence, at a capacity (ceil(0.5 * 128 / 4) = 16) that drops tokens."""
  config = _tiny_t5_config(tie_embeddings=True)
  config.model.update(gated_mlp=False, mlp_activation="relu", moe_every=2, num_layers=2,
                      num_decoder_layers=2)
  config.model.moe.update(router="switch_top1", num_experts=4, group_size=LENGTH,
                          capacity_factor=0.5, eval_capacity_factor=0.5, jitter_noise=0.0)
  return config


def _random_params(config, seed=0, scale=0.3):
  """Every parameter drawn at random (std `scale`), so that no mapping error hides
  behind a zero bias or a unit norm scale."""
  model = transformer.build(steps.model_config(config), nnx.Rngs(0))
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return model, jax.tree.unflatten(
      tree, [rng.normal(0, scale, np.shape(x)).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "llama"])
def test_same_weights_give_hf_logits(arch):
  config = _tiny_config(arch)
  model, params = _random_params(config)
  nnx.update(model, params)
  tokens = np.random.default_rng(1).integers(1, 64, (2, LENGTH))
  assert attention.causal_block_count(LENGTH) > 1
  ours = np.asarray(model(jax.numpy.asarray(tokens)))
  hf = hf_models.load(arch, params, hf_models.build(arch, config)).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
  assert ours.std() > 0.3  # Random weights: logits far from uniform.
  np.testing.assert_allclose(ours, theirs, atol=2e-4 * ours.std(), rtol=1e-4)


@pytest.mark.parametrize("tie_embeddings, fold_query_scale",
                         [(False, True), (True, True), (False, False)],
                         ids=["untied", "tied", "queries scaled in the forward pass"])
def test_same_weights_give_hf_t5_logits(tie_embeddings, fold_query_scale):
  """Encoder with padding, decoder, cross-attention, relative position biases."""
  config = _tiny_t5_config(tie_embeddings)
  config.model.fold_query_scale = fold_query_scale
  model, params = _random_params(config)
  nnx.update(model, params)
  rng = np.random.default_rng(1)
  enc = rng.integers(1, 64, (2, LENGTH))
  enc[0, 90:] = transformer.PAD_ID
  dec = rng.integers(1, 64, (2, LENGTH))
  ours = np.asarray(model(jax.numpy.asarray(enc), jax.numpy.asarray(dec)))
  hf = hf_models.load("t5", params, hf_models.build("t5", config),
                      config.model.fold_query_scale).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(enc), attention_mask=torch.from_numpy(enc != 0),
                decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
  assert ours.std() > 0.05  # Tied: x * emb_dim**-0.5 . E^T, smaller than untied.
  np.testing.assert_allclose(ours, theirs, atol=2e-4 * ours.std(), rtol=1e-4)


@pytest.mark.parametrize("arch", ["t5", "switch"])
def test_t5_and_switch_gradients_equal_hf(arch):
  """The backward pass too (bigjax's hand-written attention VJP, the relative
  biases' gradient among them; Switch: the router's and the experts', with
  tokens dropped, and a tied output): the gradients of the mean cross-entropy
  equal torch autograd's through HF's model, mapped by the same weight mapping."""
  import optax

  config = _tiny_t5_config(tie_embeddings=False) if arch == "t5" else _tiny_switch_config()
  model, params = _random_params(config)
  nnx.update(model, params)
  rng = np.random.default_rng(2)
  enc = rng.integers(1, 64, (2, LENGTH))
  enc[1, 70:] = transformer.PAD_ID
  dec, labels = rng.integers(1, 64, (2, LENGTH)), rng.integers(1, 64, (2, LENGTH))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(jax.numpy.asarray(enc), jax.numpy.asarray(dec))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.device_get(jax.grad(loss)(params))
  ours = hf_models.load(arch, grads, hf_models.build(arch, config),
                        config.model.fold_query_scale).state_dict()
  hf = hf_models.load(arch, params, hf_models.build(arch, config),
                      config.model.fold_query_scale)
  hf(input_ids=torch.from_numpy(enc), attention_mask=torch.from_numpy(enc != 0),
     decoder_input_ids=torch.from_numpy(dec), labels=torch.from_numpy(labels)).loss.backward()
  assert config.model.fold_query_scale  # T5's queries: the mapping copies them as they are.
  for name, p in hf.named_parameters():
    want = p.grad.numpy()
    assert np.abs(want).max() > 0 or ".experts." in name, name  # An expert may get no token.
    np.testing.assert_allclose(ours[name].numpy(), want, atol=1e-4 * np.abs(want).max(),
                               rtol=1e-3, err_msg=name)


def _train_side_by_side(arch, config, batches, hf_losses):
  """bigjax's train step, and the same recipe in torch on HF's model from bigjax's
  initial weights (AdamW with warmup and cosine decay, weight decay on the weight
  matrices, clipping by global norm: torch's optimizer and clipping, HF's
  learning-rate schedule), over `batches` cycled for
  config.total_steps. hf_losses(hf, batch) -> (the cross-entropy recorded, the
  loss differentiated). Returns both training curves."""
  setup = steps.make_setup(config, sharding.config_mesh(config))
  train_step, state = steps.make_train_step(setup), steps.create_state(setup, 0)
  hf = hf_models.load(arch, jax.device_get(state.params), hf_models.build(arch, config),
                      config.model.fold_query_scale)
  hf.train()
  o = config.optim
  matrices = [p for p in hf.parameters() if p.dim() >= 2]
  torch_opt = torch.optim.AdamW(
      [{"params": matrices, "weight_decay": o.weight_decay},
       {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}],
      lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  lr_schedule = hf_models.lr_scheduler(torch_opt, o, config.total_steps)
  ours, theirs = [], []
  for step in range(config.total_steps):
    batch = batches[step % len(batches)]
    state, metrics = train_step(state, loop.global_batch(setup, batch))
    ours.append(float(metrics["loss"]))
    ce, loss = hf_losses(hf, batch)
    theirs.append(ce.item())
    torch_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_norm)
    torch_opt.step()
    lr_schedule.step()
  return ours, theirs


def _short_recipe(config):
  """24 AdamW steps on 4 batches of 8 rows, cycled, so that the loss falls."""
  config.update(batch_size=8, seq_len=LENGTH, total_steps=24)
  config.optim.update(name="adamw", lr=3e-3, warmup_steps=4, schedule="cosine",
                      end_lr_factor=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                      clip_norm=1.0)
  return config


def _ce(logits, targets):
  return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                           torch.from_numpy(targets).long().flatten())


@pytest.mark.parametrize("arch", ["t5", "switch"])
def test_t5_and_switch_train_as_hf_does_from_the_same_weights(arch):
  """The same training curve as HF's model under the same recipe (Switch: with its
  router losses in the loss on both sides)."""
  config = _tiny_t5_config(tie_embeddings=False) if arch == "t5" else _tiny_switch_config()
  config = _short_recipe(config)
  rng = np.random.default_rng(6)
  batches = []
  for _ in range(4):
    enc, tgt = rng.integers(1, 64, (2, 8, LENGTH))
    enc[0, 100:] = transformer.PAD_ID
    dec = np.concatenate([np.full((8, 1), 1), tgt[:, :-1]], axis=1)
    batches.append({"encoder_inputs": enc.astype(np.int32), "decoder_inputs": dec.astype(np.int32),
                    "targets": tgt.astype(np.int32), "weights": np.ones((8, LENGTH), np.float32)})

  def hf_losses(hf, batch):
    out = hf(input_ids=torch.from_numpy(batch["encoder_inputs"]).long(),
             attention_mask=torch.from_numpy(batch["encoder_inputs"] != 0),
             decoder_input_ids=torch.from_numpy(batch["decoder_inputs"]).long(),
             labels=torch.from_numpy(batch["targets"]).long(),
             output_router_logits=arch == "switch")
    return _ce(out.logits, batch["targets"]), out.loss  # CE, plus Switch's router losses.

  ours, theirs = _train_side_by_side(arch, config, batches, hf_losses)
  assert ours[-1] < ours[0] - 0.3  # It learns: the curve is not flat.
  np.testing.assert_allclose(ours, theirs, rtol=2e-4)


def _decoder_batches(seed, count=4, rows=8):
  """Rows that repeat a random 8-token motif: in-context copying to learn."""
  motifs = np.random.default_rng(seed).integers(1, 64, (count, rows, 8))
  tokens = np.tile(motifs, (1, 1, LENGTH // 8 + 1))[..., :LENGTH + 1]
  return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32),
           "weights": np.ones((rows, LENGTH), np.float32)} for t in tokens]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_decoder_gradients_equal_hf(arch):
  """The decoders' backward pass (the hand-written causal attention VJP over row
  blocks; Mixtral: the dropless top-2 routing's gates and the experts' grouped
  products): the gradients of the mean cross-entropy equal torch autograd's
  through HF's model, mapped by the same weight mapping."""
  import optax

  config = _tiny_config(arch)
  model, params = _random_params(config, scale=0.2)
  nnx.update(model, params)
  batch = _decoder_batches(seed=7, count=1, rows=2)[0]
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(jax.numpy.asarray(batch["inputs"]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  grads = jax.device_get(jax.grad(loss)(params))
  ours = hf_models.load(arch, grads, hf_models.build(arch, config)).state_dict()
  hf = hf_models.load(arch, params, hf_models.build(arch, config))
  _ce(hf(input_ids=torch.from_numpy(batch["inputs"]).long()).logits,
      batch["targets"]).backward()
  for name, p in hf.named_parameters():
    want = p.grad.numpy()
    assert np.abs(want).max() > 0, name
    np.testing.assert_allclose(ours[name].numpy(), want, atol=1e-4 * np.abs(want).max(),
                               rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_decoders_train_as_hf_does_from_the_same_weights(arch):
  """GPT-2 and Mixtral (dropless top-2): the same training curve as HF's model.
  Cross-entropy alone on both sides: bigjax balances each MoE layer by first
  choices (routing.py), HF's Mixtral by all k choices over every layer's logits."""
  config = _short_recipe(_tiny_config(arch))
  if arch == "mixtral":
    config.model.moe.update(aux_loss_weight=0.0, z_loss_weight=0.0)

  def hf_losses(hf, batch):
    ce = _ce(hf(input_ids=torch.from_numpy(batch["inputs"]).long()).logits, batch["targets"])
    return ce, ce

  ours, theirs = _train_side_by_side(arch, config, _decoder_batches(seed=8), hf_losses)
  assert ours[-1] < ours[0] - 0.3  # It learns: the curve is not flat.
  np.testing.assert_allclose(ours, theirs, rtol=2e-4)


def test_same_weights_give_hf_switch_transformer_logits_and_router_losses():
  """Top-1 routing with tokens dropped past capacity, the experts, and the
  router's load-balancing and z losses of each stack's MoE layer (one per stack:
  over several, HF balances their concatenated logits, not each layer)."""
  config = _tiny_switch_config()
  model, params = _random_params(config)
  nnx.update(model, params)
  rng = np.random.default_rng(3)
  enc, dec = rng.integers(1, 64, (2, LENGTH)), rng.integers(1, 64, (2, LENGTH))
  labels = rng.integers(1, 64, (2, LENGTH))
  capture = nnx.capture(lambda m, *tokens: m(*tokens), nnx.Intermediate)
  ours, sown = capture(model, jax.numpy.asarray(enc), jax.numpy.asarray(dec))
  moe = steps.moe_metrics(sown)
  hf = hf_models.load("switch", params, hf_models.build("switch", config),
                      config.model.fold_query_scale).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(enc), decoder_input_ids=torch.from_numpy(dec),
                labels=torch.from_numpy(labels), output_router_logits=True)
  np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=2e-4 * ours.std(), rtol=1e-4)
  assert ours.std() > 0.05
  for stack in ("encoder", "decoder"):
    # Capacity binds, so the dropped tokens' path is compared too.
    assert float(moe[f"moe/{stack}/blocks/1/dropped"]) > 0.05
    for name in ("aux_loss", "z_loss"):
      np.testing.assert_allclose(moe[f"moe/{stack}/blocks/1/{name}"],
                                 float(getattr(theirs, f"{stack}_{name}")), rtol=1e-5,
                                 err_msg=f"{stack} {name}")


def test_gshard_top2_routing_is_fairseqs():
  """GShard top-2 against NLLB-MoE's router (fairseq's, in HF transformers): the
  same experts, renormalised gates and capacity drops for both choices, token by
  token, second choices placed after every first one (random routing off: its
  draws differ; NLLB's `second_expert_policy="all"`)."""
  num_experts, tokens = 8, 64
  logits = np.random.default_rng(4).normal(0, 2, (1, tokens, num_experts)).astype(np.float32)
  cap = routing.capacity(tokens, num_experts, 2, 0.5)  # 8 slots for ~16 choices each.
  ours = routing.gshard_top2(jax.numpy.asarray(logits), cap, random_routing=False)
  router = transformers.models.nllb_moe.modeling_nllb_moe.NllbMoeTop2Router(
      transformers.NllbMoeConfig(num_experts=num_experts, expert_capacity=cap,
                                 second_expert_policy="all", router_dtype="float32",
                                 normalize_router_prob_before_dropping=True,
                                 batch_prioritized_routing=False,
                                 moe_eval_capacity_token_fraction=-1.0))
  _, gates = router.route_tokens(torch.from_numpy(logits[0]), torch.float32)
  ours_gates = np.asarray(ours.combine.sum(-1)[0])  # [tokens, experts]
  np.testing.assert_allclose(ours_gates, gates.numpy(), atol=1e-6)
  kept = (np.asarray(ours.dispatch.sum(-1)[0]) > 0).sum(-1)
  assert (kept == 2).any() and (kept == 1).any() and (kept == 0).any()  # Drops occur.


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_are_t5s(buckets, distance, bidirectional):
  offsets = np.arange(-400, 401)[None]
  ours = relative_position.bucket(jax.numpy.asarray(offsets), bidirectional=bidirectional,
                                  num_buckets=buckets, max_distance=distance)
  theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(offsets), bidirectional=bidirectional, num_buckets=buckets,
      max_distance=distance)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
  assert np.asarray(ours).max() == buckets - 1  # Offsets reach the saturated bucket.


def test_beam_search_finds_hf_generates_beams():
  """bigjax's beam search against HF's `generate(num_beams=4)` on the same GPT-2
  weights: the same best continuation, token for token (no EOS, no length penalty,
  so both rank beams by log-probability alone)."""
  config = _tiny_config("gpt2")
  # Smaller weights than the logit tests': a next-token distribution spread enough
  # for the beams to leave greedy search's path.
  model, params = _random_params(config, scale=0.2)
  nnx.update(model, params)
  hf = hf_models.load("gpt2", params, hf_models.build("gpt2", config)).eval()
  prompts = np.random.default_rng(5).integers(1, 64, (3, 6))
  ours = beam_search.beam_search(model, prompts.tolist(), beam_size=4, max_new_tokens=12,
                                 length_penalty=0.0, eos_id=None)
  greedy = decode.generate(model, prompts.tolist(), max_new_tokens=12, eos_id=None)
  with torch.no_grad():
    theirs = hf.generate(torch.from_numpy(prompts), attention_mask=torch.ones(3, 6),
                         do_sample=False, num_beams=4, max_new_tokens=12, min_new_tokens=12,
                         length_penalty=0.0, early_stopping=False, eos_token_id=None,
                         pad_token_id=0)[:, 6:].tolist()
  assert ours == theirs
  assert ours != greedy  # The beams found something greedy search did not.


def test_t5_greedy_decoding_equals_hf_generate():
  """bigjax's encoder-decoder greedy decoding against HF's plain `generate()` on the
  same T5 weights: the mapped config carries bigjax's special ids (decoding starts
  from BOS, not HF's default 0), so no decoder_input_ids are needed."""
  config = _tiny_t5_config(tie_embeddings=False)
  model, params = _random_params(config, scale=0.2)
  nnx.update(model, params)
  hf = hf_models.load("t5", params, hf_models.build("t5", config),
                      config.model.fold_query_scale).eval()
  inputs = np.random.default_rng(3).integers(3, 64, (3, 9))
  ours = decode.generate(model, inputs.tolist(), max_new_tokens=10, eos_id=None)
  with torch.no_grad():  # HF's cache breaks on a decoder deeper than the encoder.
    theirs = hf.generate(torch.from_numpy(inputs), do_sample=False, max_new_tokens=10,
                         min_new_tokens=10, eos_token_id=None, use_cache=False)
  assert theirs[:, 0].tolist() == [decode.BOS_ID] * 3
  assert ours == theirs[:, 1:].tolist()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (10, 0.5), (0, 0.05)])
def test_sampling_filter_keeps_hf_warpers_tokens(top_k, top_p):
  """decode.filter_logits against HF generate's TopK then TopP warpers: the same
  tokens survive (top_p=0.05 keeps only the most likely token on both sides)."""
  from transformers.generation import logits_process

  logits = np.random.default_rng(9).normal(0, 3, (16, 64)).astype(np.float32)
  ours = np.isfinite(np.asarray(decode.filter_logits(jax.numpy.asarray(logits), top_k, top_p)))
  theirs = torch.from_numpy(logits)
  if top_k:
    theirs = logits_process.TopKLogitsWarper(top_k)(None, theirs)
  if top_p < 1.0:
    theirs = logits_process.TopPLogitsWarper(top_p)(None, theirs)
  np.testing.assert_array_equal(ours, np.isfinite(theirs.numpy()))
  assert 1 <= ours.sum(-1).min() and ours.sum(-1).max() < 64


def test_biases_change_the_gpt2_function():
  """The bias mapping is exercised: zeroing bigjax's biases changes the logits."""
  config = _tiny_config("gpt2")
  model, params = _random_params(config)
  nnx.update(model, params)
  tokens = np.random.default_rng(1).integers(1, 64, (2, 16))
  with_bias = np.asarray(model(jax.numpy.asarray(tokens)))
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "bias" in jax.tree_util.keystr(p)
      and "norm" not in jax.tree_util.keystr(p) else x, params)
  nnx.update(model, zeroed)
  assert np.abs(np.asarray(model(jax.numpy.asarray(tokens))) - with_bias).max() > 0.1


@pytest.mark.slow
def test_peer_speed_part_runs_at_a_tiny_shape():
  """peer.py --part=speed, both architectures, end to end (one device, as its
  README figures ran): CI, without the bench extra, never runs this path."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  done = subprocess.run(
      [sys.executable, "experiments/benchmarks/peer.py", "--part=speed",
       "--speed_shape=1,64,2,128,32,2", "--rounds=2", "--steps_per_round=1"],
      cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for text in ("Speed (gpt2)", "Speed (mixtral)", "over the rounds", "MFU",
               "The MoE layer alone", "One expert chunk's product", "The step's matmuls alone"):
    assert text in done.stdout, done.stdout
  assert done.stdout.count("bigjax / pytorch") == 5, done.stdout
