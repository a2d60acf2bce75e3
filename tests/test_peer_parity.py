"""bigjax trains as well as the same model in PyTorch (HF transformers' GPT-2).

The reference figure is not bigjax's own: it is what HF's GPT2LMHeadModel reached
on the same recipe, batches and validation windows, printed by

  python experiments/benchmarks/peer.py --part=quality --steps=300

(2026-11-28, torch 2.14.1, transformers 5.24.0: pytorch 3.4087 bits/byte after
300 steps, from 8.37 at its initialisation). Before the tied-logit fix bigjax's
training loss was still 5.6 nats (8 bits/byte) at step 100 of this recipe.
"""
import pytest

from bigjax import train
from configs import gpt2

PEER_BITS_PER_BYTE_AT_300 = 3.4087
# The two start from different random initialisations; bigjax measured 3.417
# against the peer's 3.409 in the same peer.py run.
MARGIN = 0.05


@pytest.mark.slow
def test_baby_gpt_matches_hf_gpt2_after_300_steps(tmp_path):
  config = gpt2.get_config("baby")
  config.total_steps = 300  # The schedule (warmup, cosine) follows, as in peer.py.
  config.checkpoint_every = config.eval_every = 300
  # 8 test devices: batch 12 over data=2, and the model over tensor=4.
  config.mesh.update(data=2, tensor=4)
  result = train.run(config, str(tmp_path / "baby"))
  bits = result.eval_metrics["eval_bits_per_byte"]
  assert bits < PEER_BITS_PER_BYTE_AT_300 + MARGIN, bits
