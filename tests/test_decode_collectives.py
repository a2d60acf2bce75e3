"""Data-parallel decoding keeps each prompt's rows, and their KV cache, on their own
devices: the compiled sampling and beam-search loops hold no all-gather (nor any
other collective but the loop's scalar stopping test), and their results equal
those of one device.

What used to gather, per layer: the cache writes (a scatter indexed by (row,
slot) pairs, which GSPMD cannot prove row-local: every device's keys/values and
indices went to every device, the whole batch's prompt keys/values at prefill),
the "valid" mask's write, beam search's reorder of the cache (a take of global
rows: the whole cache, per layer and step) and its top-k over every prompt's
candidates (XLA's TopK is not partitioned: every step's K * vocab log-probs).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax import beam_search, decode, decode_batch, sharding
from bigjax.models import transformer
from configs import common

VOCAB = 64
NEW = 6
DATA = 4
BEAMS = 3  # b * K rows split over DATA devices, K not a divisor of anything here.

MODELS = {
    "decoder": dict(position="rotary"),
    "decoder_scanned": dict(position="learned", scan_layers=True),
    "encdec": dict(kind="encdec", position="relative", relative_buckets=8,
                   relative_max_distance=12),
}

# Output shape(s) and name of each collective in compiled HLO (async forms included).
_COLLECTIVE = re.compile(r"= (\([^)]*\)|\S+) (all-gather|all-reduce|all-to-all|"
                         r"collective-permute|reduce-scatter|collective-broadcast)(-start)?\(")


def _model(kind="decoder", **kw):
  args = dict(kind=kind, vocab_size=VOCAB, num_layers=2, emb_dim=32, num_heads=4,
              num_kv_heads=2, mlp_dim=64, max_len=40, init_scale=0.5)
  return transformer.build(transformer.TransformerConfig(**{**args, **kw}), nnx.Rngs(0))


def _mesh():
  assert jax.device_count() >= DATA, "needs the suite's fake CPU devices (tests/conftest.py)"
  return sharding.make_mesh(dict(data=DATA), jax.devices()[:DATA]), common.default_rules()


def _prompts(seed=0, lengths=(5, 9, 1, 7, 3, 6)):  # 6 rows: padded to 8, 2 per device.
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(3, VOCAB, n))) for n in lengths]


def _collectives(hlo: str) -> list[str]:
  """'name shape  (op_name)' of each collective in compiled HLO."""
  found = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      found.append(f"{m.group(2)} {m.group(1)}  ({op.group(1) if op else '?'})")
  return found


def _assert_row_local(hlo: str, what: str):
  found = _collectives(hlo)
  # The while loop's stopping test (every row done?) is one scalar all-reduce.
  moved = [c for c in found if not c.startswith("all-reduce pred[] ")]
  assert not moved, f"{what} moves data between devices:\n" + "\n".join(moved)
  assert len(found) - len(moved) <= 2, found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_decoding_loops_gather_nothing(name):
  mesh, rules = _mesh()
  model = _model(**MODELS[name])
  p = decode_batch.prepare(model, _prompts(), NEW, None, mesh, rules)
  assert p.tokens.shape[0] == 2 * DATA
  graphdef, state = nnx.split(model)
  static = dict(steps=p.steps, cache_len=p.cache_len, eos_id=2, mesh=mesh,
                rules=decode_batch.static_rules(rules))
  sample = decode._sample_loop.lower(
      graphdef, state, p.tokens, p.lengths, jax.random.PRNGKey(0), jnp.float32(1.0),
      jnp.int32(5), jnp.float32(0.9), jnp.int32(NEW), jnp.int32(p.num), greedy=False,
      **static
  ).compile().as_text()
  _assert_row_local(sample, "the sampling loop")
  beam = beam_search._beam_loop.lower(graphdef, state, p.tokens, p.lengths, jnp.float32(0.6),
                                      jnp.int32(NEW), jnp.int32(p.num), beam_size=BEAMS,
                                      **static).compile().as_text()
  _assert_row_local(beam, "the beam-search loop")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sharded_decoding_equals_one_device(name):
  mesh, rules = _mesh()
  model = _model(**MODELS[name])
  prompts = _prompts(1)
  for kw in (dict(temperature=1.0, top_k=5, top_p=0.9, seed=3),
             dict(beam_size=BEAMS, length_penalty=0.6)):
    kw = dict(kw, max_new_tokens=NEW, eos_id=None, return_scores=True)
    want_tokens, want_scores = decode.generate(model, prompts, **kw)
    got_tokens, got_scores = decode.generate(model, prompts, mesh=mesh, rules=rules, **kw)
    assert got_tokens == want_tokens, kw
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
