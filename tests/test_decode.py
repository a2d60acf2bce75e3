"""KV-cached decoding (bigjax.decode, beam_search, decode_batch) against full
recomputation, and the generate CLI.

The models are tiny (1-2 layers, width 32) with a large init scale, so that the
logits are far from ties and exact token equality is a meaningful check.
MoE note: capacity routing lets the tokens of a group compete for expert slots.
The cached prefill routes the prompt in groups, each decode step routes one token
per row alone, and full recomputation routes the whole window's real tokens in
groups, so they agree exactly only when nothing is dropped: the MoE model here
has eval_capacity_factor = num_experts / k, i.e. capacity = group size.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bigjax import beam_search, checkpoint_reader, decode, decode_batch, sharding, steps
from bigjax.data import tokenizer
from bigjax.models import moe as moe_lib
from bigjax.models import transformer
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
NEW = 10


def _model(kind="decoder", **kw):
  args = dict(kind=kind, vocab_size=VOCAB, num_layers=2, emb_dim=32, num_heads=4,
              num_kv_heads=2, mlp_dim=64, max_len=40, init_scale=0.5)
  return transformer.build(transformer.TransformerConfig(**{**args, **kw}), nnx.Rngs(0))


MODELS = {
    "decoder_dense_learned": dict(position="learned"),
    "decoder_dense_rotary": dict(position="rotary", num_layers=1),
    "decoder_moe_gshard_top2": dict(moe_every=2, moe=moe_lib.MoEConfig(
        num_experts=4, router="gshard_top2", group_size=4, eval_capacity_factor=2.0)),
    "encdec_rotary": dict(kind="encdec", position="rotary", num_layers=1),
    # Buckets that saturate within the windows: exact, logarithmic and far offsets.
    "decoder_dense_relative": dict(position="relative", relative_buckets=8,
                                   relative_max_distance=12),
    "encdec_relative": dict(kind="encdec", position="relative", num_layers=1,
                            relative_buckets=8, relative_max_distance=12),
}


@pytest.fixture(scope="module")
def models():
  return {name: _model(**kw) for name, kw in MODELS.items()}


def _prompts(seed=0, lengths=(5, 9, 1)):
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(3, VOCAB, n))) for n in lengths]


# --------------------------------------------------------------------------
# Cache equals recomputation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_equals_full_recomputation(models, name):
  model, prompts = models[name], _prompts()
  got, got_lp = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None,
                                return_scores=True)
  want, want_lp = decode.generate_recompute(model, prompts, max_new_tokens=NEW, eos_id=None,
                                            return_scores=True)
  assert got == want
  assert all(len(g) == NEW for g in got)
  np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5)
  # Not trivially constant: the rows continue differently.
  assert len({tuple(g) for g in got}) == len(got)


def test_cached_step_logits_equal_the_full_forward(models):
  """decode_step one token at a time reproduces the full forward's logits."""
  model = models["decoder_dense_learned"]
  tokens = jnp.asarray(_prompts(1, (12,)), jnp.int32)
  full = np.asarray(model(tokens))
  graphdef, state = nnx.split(model)
  cache = decode.init_cache(graphdef, state, 1, 16)
  step = jax.jit(decode.decode_step, static_argnums=0)
  outs = []
  for t in range(12):
    logits, cache = step(graphdef, state, cache, tokens[:, t:t + 1], jnp.full((1, 1), t))
    outs.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_with_the_cache_equals_recomputation_with_the_same_seed(models):
  model, prompts = models["decoder_dense_learned"], _prompts(2)
  kw = dict(max_new_tokens=NEW, temperature=0.9, top_k=20, top_p=0.9, seed=5, eos_id=None)
  got = decode.generate(model, prompts, **kw)
  assert got == decode.generate_recompute(model, prompts, **kw)
  assert got != decode.generate(model, prompts, **{**kw, "seed": 6})


def test_batched_prompts_of_different_lengths_equal_each_alone(models):
  model = models["decoder_dense_learned"]
  prompts = _prompts(3, (3, 8))
  batched = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None)
  alone = [decode.generate(model, [p], max_new_tokens=NEW, eos_id=None)[0] for p in prompts]
  assert batched == alone


def test_calls_whose_shapes_share_buckets_reuse_one_compiled_loop():
  # A notebook's next prompt or max_new_tokens should not compile the loop again.
  model = _model(emb_dim=24, num_heads=2)  # A model no other test compiles for.
  rng = np.random.default_rng(7)
  calls = [(_prompts(1, (5, 9, 12)), 10), (_prompts(2, (16, 3, 7, 2)), 9), (_prompts(3, (11,)), 16)]
  for loop, run in ((decode._sample_loop, decode.generate),
                    (beam_search._beam_loop,
                     lambda *a, **kw: beam_search.beam_search(*a, beam_size=2, **kw))):
    before = loop._cache_size()
    for prompts, new in calls[:2]:
      out = run(model, prompts, max_new_tokens=new, eos_id=None)
      assert [len(o) for o in out] == [new] * len(prompts)  # Cut to what was asked.
    assert loop._cache_size() == before + 1
    # One prompt is its own bucket of rows; a longer prompt a wider one.
    run(model, calls[2][0], max_new_tokens=calls[2][1], eos_id=None)
    run(model, [list(map(int, rng.integers(3, VOCAB, 17)))], max_new_tokens=4, eos_id=None)
    assert loop._cache_size() == before + 3


def test_padding_rows_are_done_from_the_start(models):
  # 3 prompts run as 4 rows; the 4th, sampled with its own key, would otherwise
  # keep the loop going after every real row stopped at EOS.
  model, prompts = models["decoder_dense_learned"], _prompts(5, (4, 6, 3))
  p = decode_batch.prepare(model, prompts, 12, None, None, None)
  assert p.tokens.shape[0] == 4 and p.num == 3
  graphdef, state = nnx.split(model)
  out, _ = decode._sample_loop(graphdef, state, p.tokens, p.lengths, jax.random.PRNGKey(0),
                               jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0),
                               jnp.int32(12), jnp.int32(p.num), steps=p.steps,
                               cache_len=p.cache_len, greedy=False, eos_id=None, mesh=None,
                               rules=None)
  out = np.asarray(out)
  assert (out[3, 1:] == decode.PAD_ID).all() and (out[:3, :12] != decode.PAD_ID).all()


def test_bucketed_shapes_stay_within_the_learned_positions(models):
  # Prompt 30 + 10 new = max_len 40: the buckets (32, 16) would pass the table.
  model, prompt = models["decoder_dense_learned"], _prompts(4, (30,))
  p = decode_batch.prepare(model, prompt, 10, None, None, None)
  assert p.tokens.shape[1] + p.steps <= 40 and p.steps >= 10
  got = decode.generate(model, prompt, max_new_tokens=10, eos_id=None)
  assert got == decode.generate_recompute(model, prompt, max_new_tokens=10, eos_id=None)
  # Near the table's end, nearby lengths still share one shape.
  shapes = {(p.tokens.shape[1], p.steps) for p in (
      decode_batch.prepare(model, _prompts(6, (longest,)), new, None, None, None)
      for longest in (17, 20, 24) for new in (9, 12, 16))}
  assert shapes == {(24, 16)}
  for longest in range(1, 40):  # Every fit is within the table and holds the call.
    for new in range(1, 41 - longest):
      width, steps = decode_batch.fit_buckets(longest, new, 40)
      assert width >= longest and steps >= new and width + steps <= 40


def test_rows_stop_at_eos(models):
  model, prompts = models["decoder_dense_learned"], _prompts()
  full = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None)
  eos = full[0][3]  # Pretend the 4th token of row 0 is EOS.
  got = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=eos)
  for row, want in zip(got, full):
    cut = want.index(eos) + 1 if eos in want else NEW
    assert row == want[:cut]
  assert len(got[0]) <= 4


# --------------------------------------------------------------------------
# Sampling filters
# --------------------------------------------------------------------------


def np_filter(logits, top_k, top_p):
  """Reference: keep the top_k logits, then the smallest most-likely set with mass >= p
  (ties broken towards the lower token id)."""
  out = np.full_like(logits, -np.inf)
  for i, row in enumerate(logits):
    order = np.argsort(-row, kind="stable")
    k = top_k if top_k > 0 else len(row)
    kept = order[:k]
    p = np.exp(row[kept] - row[kept].max())
    p /= p.sum()
    mass, n = 0.0, 0
    while n < len(kept) and (n == 0 or mass < top_p or top_p >= 1.0):
      mass += p[n]
      n += 1
    out[i, kept[:n]] = row[kept[:n]]
  return out


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5),
                                          (0, 0.9), (0, 0.999), (4, 0.6), (0, 1e-4)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
  logits[1] = np.linspace(-2, 2, 50)  # smooth
  logits[2, :] = -5.0
  logits[2, 7] = 4.0  # one dominant token
  got = np.asarray(jax.jit(decode.filter_logits)(logits, top_k, top_p))
  want = np_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])
  # The kept set has mass >= top_p, and dropping its least likely token would not.
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if top_k == 0:
    kept = np.where(np.isfinite(got), probs, 0)
    assert (kept.sum(-1) >= top_p - 1e-6).all()
    least = np.where(np.isfinite(got), probs, np.inf).min(-1)
    assert (kept.sum(-1) - least < top_p + 1e-6).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_frequencies_follow_the_tempered_softmax(temperature):
  """20,000 draws from one logits row, unfiltered: each token's frequency is its
  probability under softmax(logits / temperature), written out in numpy."""
  z = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
  n = 20_000
  draws = decode._choose(jnp.tile(jnp.asarray(z), (n, 1)), decode._row_keys(
      jax.random.PRNGKey(0), n), 0, jnp.float32(temperature), jnp.int32(0),
      jnp.float32(1.0), greedy=False)
  freq = np.bincount(np.asarray(draws), minlength=z.size) / n
  p = np.exp(z / temperature - (z / temperature).max())
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.012)  # ~4 standard errors.


def test_top_k_one_equals_greedy(models):
  model, prompts = models["decoder_dense_learned"], _prompts()
  greedy = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None)
  for seed in (0, 1):
    assert decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None, temperature=1.5,
                           top_k=1, seed=seed) == greedy


# --------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _sequence_logprobs(model, prompts, continuations):
  """Teacher-forced log p(continuation | prompt) per row from one full forward pass
  (rows right-padded: padded keys are masked, and causality hides them anyway)."""
  rows = [p + c for p, c in zip(prompts, continuations)]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  logp = jax.nn.log_softmax(np.asarray(_forward(model, jnp.asarray(tokens))), -1)
  return [float(sum(logp[i, len(p) - 1 + j, t] for j, t in enumerate(c)))
          for i, (p, c) in enumerate(zip(prompts, continuations))]


@pytest.mark.parametrize("eos_id", [None, "frequent"])
def test_beam_size_one_equals_greedy(models, eos_id):
  model, prompts = models["decoder_dense_learned"], _prompts()
  if eos_id == "frequent":
    eos_id = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None)[1][2]
  greedy = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=eos_id)
  beam = beam_search.beam_search(model, prompts, beam_size=1, max_new_tokens=NEW,
                                 length_penalty=0.0, eos_id=eos_id)
  assert beam == greedy


def test_beam_search_scores_at_least_greedy(models):
  model, prompts = models["decoder_dense_learned"], _prompts()
  greedy, greedy_lp = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None,
                                      return_scores=True)
  beams, scores, lps = beam_search.beam_search(model, prompts, beam_size=4, max_new_tokens=NEW,
                                               length_penalty=0.0, eos_id=None, return_scores=True)
  for b, s, lp, g_lp in zip(beams, scores, lps, greedy_lp):
    assert len(b) == NEW
    assert s == lp  # length_penalty 0: the score is the log-probability
    assert s >= g_lp - 1e-5
  # The reported scores are the model's: recomputed by teacher forcing.
  np.testing.assert_allclose(_sequence_logprobs(model, prompts + prompts, beams + greedy),
                             lps + greedy_lp, rtol=1e-4)
  assert any(s > g + 1e-3 for s, g in zip(scores, greedy_lp))  # beam search found better


def test_beam_search_length_penalty_and_eos(models):
  model, prompts = models["encdec_rotary"], _prompts()
  eos_id = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=None)[0][4]
  out, scores, lps = beam_search.beam_search(model, prompts, beam_size=3, max_new_tokens=NEW,
                                             length_penalty=0.6, eos_id=eos_id, return_scores=True)
  for row, s, lp in zip(out, scores, lps):
    assert 1 <= len(row) <= NEW
    assert eos_id not in row[:-1]
    n = len(row) if row[-1] == eos_id else NEW
    np.testing.assert_allclose(s, lp / ((5 + n) / 6) ** 0.6, rtol=1e-5)


# --------------------------------------------------------------------------
# Sharded decoding
# --------------------------------------------------------------------------


def test_sharded_decoding_equals_one_device():
  config = lm.get_config("runlocal")
  config.model.init_scale = 0.5  # logits far from ties
  mesh = sharding.make_mesh(dict(data=2, tensor=2, fsdp=2))
  setup = steps.make_setup(config, mesh)
  state = steps.create_state(setup, seed=0)
  emb = state.params["embedder"]["tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  model = setup.model(state.params)
  local = setup.model(jax.device_get(state.params))
  rng = np.random.default_rng(7)
  prompts = [list(map(int, rng.integers(3, 259, n))) for n in (4, 11, 7)]  # 3 rows: padded
  kw = dict(max_new_tokens=12, max_len=config.model.max_len, eos_id=None)
  want = decode.generate(local, prompts, **kw)
  assert decode.generate(model, prompts, mesh=setup.mesh, rules=setup.rules, **kw) == want
  beam_kw = dict(kw, beam_size=2, length_penalty=0.6)
  assert (decode.generate(model, prompts, mesh=setup.mesh, rules=setup.rules, **beam_kw) ==
          decode.generate(local, prompts, **beam_kw))


# --------------------------------------------------------------------------
# API and CLI
# --------------------------------------------------------------------------


def test_sample_keeps_its_signature(models):
  model, prompts = models["decoder_dense_learned"], _prompts(2)
  out = decode.sample(model, prompts, max_new_tokens=NEW, max_len=40, temperature=0.7,
                      seed=0, eos_id=None)  # eos_id=None: shares a compilation
  assert out == decode.generate(model, prompts, max_new_tokens=NEW, temperature=0.7, seed=0,
                                eos_id=None)
  with pytest.raises(ValueError, match=r"max_len=40; lower max_new_tokens to 37 or less"):
    decode.sample(model, [[5, 6, 7]], max_new_tokens=40, max_len=40)
  with pytest.raises(ValueError, match=r"shorten the prompt to 39 tokens or less"):
    decode.sample(model, [[5] * 40], max_new_tokens=1, max_len=40)
  # No prompt fits beside 40 new tokens: both must change.
  with pytest.raises(ValueError, match=r"lower max_new_tokens below 40 and shorten the prompt"):
    decode.sample(model, [[5] * 40], max_new_tokens=40, max_len=40)


def test_invalid_settings_are_rejected(models):
  model = models["decoder_dense_learned"]
  with pytest.raises(ValueError, match="top_p"):
    decode.generate(model, [[5]], max_new_tokens=2, temperature=1.0, top_p=0.0)
  for settings in (dict(temperature=1.0), dict(top_k=5), dict(top_p=0.9)):  # Unused by beams.
    with pytest.raises(ValueError, match="temperature=0, top_k=0 and top_p=1"):
      decode.generate(model, [[5]], max_new_tokens=2, beam_size=2, **settings)
  with pytest.raises(ValueError, match="empty"):
    decode.generate(model, [[]], max_new_tokens=2)
  # NaN passes a `< 0` test: it would decode padding (sampling) or NaN scores (beams).
  with pytest.raises(ValueError, match="temperature=nan"):
    decode.generate(model, [[5]], max_new_tokens=2, temperature=float("nan"))
  for eos_id in (VOCAB, -1):
    with pytest.raises(ValueError, match=rf"eos_id={eos_id} is outside the model's vocab"):
      decode.generate(model, [[5]], max_new_tokens=2, eos_id=eos_id)
  with pytest.raises(ValueError, match="length_penalty=nan"):
    beam_search.beam_search(model, [[5]], beam_size=2, max_new_tokens=2,
                            length_penalty=float("nan"))
  # A padded array's PAD would be read as a token (its key masked): other text.
  with pytest.raises(ValueError, match=f"Prompt 1 holds the padding id {decode.PAD_ID}"):
    decode.generate(model, np.array([[5, 6, 7], [5, 6, decode.PAD_ID]]), max_new_tokens=2)
  with pytest.raises(ValueError, match=r"pass one prompt as \[ids\]"):
    decode.generate(model, [5, 6, 7], max_new_tokens=2)  # Three one-token prompts before.
  prompts = [[5, 6], [7]]  # Any iterable of prompts, a generator too.
  assert (decode.generate(model, (p for p in prompts), max_new_tokens=2)
          == decode.generate(model, prompts, max_new_tokens=2))
  encoder = transformer.build(transformer.TransformerConfig(kind="encoder", vocab_size=VOCAB,
                                                            num_layers=1, emb_dim=32,
                                                            num_heads=4, mlp_dim=32),
                              nnx.Rngs(0))
  with pytest.raises(ValueError, match="encoder-decoder"):
    decode.generate(encoder, [[5]], max_new_tokens=2)


def _env(devices: int) -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def _generate_cli(*flags, devices=1):
  cmd = [sys.executable, "-m", "bigjax.generate", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=_env(devices))


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
  r = _generate_cli(f"--workdir={tmp_path / 'missing'}", "--prompt=x")
  assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
  with open(tmp_path / "config.json", "w") as f:
    f.write(lm.get_config("runlocal").to_json_best_effort())
  r = _generate_cli(f"--workdir={tmp_path}", "--prompt=x")
  assert r.returncode != 0 and "checkpoint" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_generate_cli_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  # Trained on one device; restored onto one device and onto an 8-device mesh.
  train = subprocess.run(
      [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
       f"--workdir={workdir}", "--config.total_steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(1))
  assert train.returncode == 0, train.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 2
  # A save still being written (e.g. by a run that continues training) is neither
  # read nor touched: generation reads the checkpoints read-only.
  in_flight = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-123")
  os.makedirs(in_flight)
  printed = {}
  settings = ((1, dict(temperature=1.0, top_k=50, top_p=0.95, seed=1)),
              (8, dict(beam_size=3, length_penalty=0.6)))
  for devices, kw in settings:
    r = _generate_cli(f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=8",
                      *[f"--{k}={v}" for k, v in kw.items()], devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    printed[devices] = r.stdout
    # What it printed is the checkpoint decoded here, in memory, on one device
    # (text mode reads any "\r" as a newline: the same for both).
    want = _decode_in_memory(workdir, "def ", max_new_tokens=8, **kw)
    assert want and r.stdout == want.replace("\r\n", "\n").replace("\r", "\n") + "\n"
  assert os.path.isdir(in_flight)
  # A run recorded before model.norm_eps, attention_impl, relative_buckets,
  # relative_max_distance and num_classes existed (it used 1e-6, lm.py's value,
  # bigjax's own attention, no relative table and no classifier) still generates,
  # the same text.
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    old = json.load(f)
  assert old["model"].pop("norm_eps") == 1e-6
  assert old["model"].pop("attention_impl") == "auto"
  for key in ("relative_buckets", "relative_max_distance", "num_classes", "fold_query_scale"):
    old["model"].pop(key)
  with open(path, "w") as f:
    json.dump(old, f)
  again = _generate_cli(f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=8",
                        *[f"--{k}={v}" for k, v in settings[0][1].items()])
  assert again.returncode == 0 and again.stdout == printed[1], again.stderr[-3000:]


def _decode_in_memory(workdir: str, prompt: str, **kw) -> str:
  """The latest checkpoint of `workdir` restored in this process and decoded."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  setup = steps.make_setup(config, sharding.make_mesh(dict(data=1), jax.devices()[:1]))
  reader = checkpoint_reader.CheckpointReader(workdir)
  try:
    params, _, _ = reader.restore_latest_intact_params(setup.abstract_state,
                                                       setup.state_shardings, print)
  finally:
    reader.close()
  out = decode.generate(setup.model(params), [list(tokenizer.encode(prompt))],
                        max_len=config.model.max_len, eos_id=tokenizer.EOS_ID, **kw)[0]
  return tokenizer.decode(out)


def test_an_moe_run_recorded_before_capacity_dispatch_still_loads(tmp_path):
  """GShard's einsums were its only dispatch then: the recorded config gets that,
  and validates as today's configs do."""
  from bigjax import config as config_lib, generate
  from configs import lm_moe
  values = json.loads(lm_moe.get_config("runlocal").to_json())
  assert values["model"]["moe"].pop("capacity_dispatch") == "auto"
  (tmp_path / "config.json").write_text(json.dumps(values))
  config = generate.load_config(str(tmp_path))
  assert config.model.moe.capacity_dispatch == "einsum"
  config_lib.validate(config, num_devices=jax.device_count())


def test_a_run_predating_a_setting_nobody_filled_in_is_a_message(tmp_path):
  from bigjax import generate
  from configs import lm
  values = json.loads(lm.get_config("runlocal").to_json())
  del values["mesh_axes"]  # Added 2026-11-29; recorded_config fills model settings only.
  (tmp_path / "config.json").write_text(json.dumps(values))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(generate.GenerateError, match=r"config.json has no setting 'mesh_axes': "
                     "the run predates it"):
    generate.load_model(str(tmp_path))
