r"""T5-style encoder-decoder (pre-RMSNorm, gated-GELU MLP, one embedding table
shared by encoder, decoder and output, Adafactor with an inverse-sqrt schedule)
on a sequence-to-sequence task built from the corpus: each chunk of Python
source in, the same chunk reversed out.

  python -m bigjax.main --config=configs/t5.py:runlocal --workdir=/tmp/t5_local  # ~20 s
  python -m bigjax.main --config=configs/t5.py:demo --workdir=/tmp/t5_demo  # 32-byte chunks
  python -m bigjax.generate --workdir=/tmp/t5_local --prompt="import o" --max_new_tokens=7
`runlocal` reverses 8-byte chunks and reaches ~80% per-byte accuracy (a unigram
guess gets ~20%). Positions are learned absolute embeddings: T5's relative
buckets (like rotary) see only offsets, and reversing needs to know that decoder
position j reads encoder position L-1-j.
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, demo=False)
  config = lm.get_config(",".join(k for k in ("runlocal", "demo") if arg[k]))
  config.task = "reverse"
  config.model.update(kind="encdec", norm="rmsnorm", mlp_activation="gelu", gated_mlp=True,
                      position="learned", dropout_rate=0.1, init="lecun")
  config.optim.update(name="adafactor", lr=1e-2, schedule="rsqrt", weight_decay=0.0,
                      clip_norm=0.0)
  if arg.runlocal or arg.demo:
    config.total_steps = 600
    config.batch_size = 32
    config.seq_len = config.model.max_len = 32 if arg.demo else 8
    config.model.dropout_rate = 0.0
    config.log_every = config.eval_every = config.checkpoint_every = 200
    # Adafactor's parameter-relative steps and the rsqrt decay suit long runs;
    # runs of minutes learn faster with AdamW and a short cosine.
    config.optim.update(name="adamw", lr=3e-3, schedule="cosine", warmup_steps=20,
                        clip_norm=1.0)
  return config
