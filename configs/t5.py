r"""T5-style encoder-decoder (pre-RMSNorm, gated-GELU MLP, one embedding table
shared by encoder, decoder and output, Adafactor with an inverse-sqrt schedule)
on a sequence-to-sequence task built from the corpus: each chunk of Python
source in, the same chunk reversed out.

  python -m bigjax.main --config=configs/t5.py:runlocal --workdir=/tmp/t5_local  # ~1 min
  python -m bigjax.generate --workdir=/tmp/t5_local --prompt="import os" --max_new_tokens=9
Positions are rotary rather than T5's relative-position buckets.
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = lm.get_config("runlocal" if arg.runlocal else None)
  config.task = "reverse"
  config.model.update(kind="encdec", norm="rmsnorm", mlp_activation="gelu", gated_mlp=True,
                      position="rotary", dropout_rate=0.1, init="lecun")
  config.optim.update(name="adafactor", lr=1e-2, schedule="rsqrt", weight_decay=0.0,
                      clip_norm=0.0)
  if arg.runlocal:
    config.model.dropout_rate = 0.0
    config.total_steps = 150
    config.seq_len = 16
    config.model.max_len = 16
    config.log_every = config.eval_every = config.checkpoint_every = 50
  return config
