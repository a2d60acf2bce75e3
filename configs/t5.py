r"""T5.1.1 encoder-decoder (pre-RMSNorm, gated-GELU MLP, T5's relative position
biases, one unit-variance embedding table shared by encoder and decoder, a separate
output projection, no biases, queries unscaled with the 1/sqrt(head_dim) in their
init, Adafactor with an inverse-sqrt schedule; given the same weights, the same
function as HF transformers' T5ForConditionalGeneration, and with the same AdamW
recipe the same training curve: tests/test_hf_equivalence.py)
on a sequence-to-sequence task built from the corpus: each chunk of Python
source in, the same chunk reversed out.

  python -m bigjax.main --config=configs/t5.py:runlocal --workdir=/tmp/t5_local  # ~20 s
  python -m bigjax.main --config=configs/t5.py:demo --workdir=/tmp/t5_demo  # ~40 s
  python -m bigjax.generate --workdir=/tmp/t5_demo --prompt="return self._dat" \
      --max_new_tokens=15   # -> "tad_.fles nrute"
`runlocal` reverses 8-byte chunks (100% per-byte accuracy after 600 steps,
99.6% already at step 200; a guess blind to the input gets the most common byte,
a space, ~30%), `demo` 16-byte chunks (100% of the 1,024 evaluated bytes after
1,500 steps, already at step 500), both with a 2-layer, 64-wide model.
The two variants use learned absolute positions instead: T5's relative buckets
(like rotary) see only offsets, and reversing needs to know that decoder position j
reads encoder position L-1-j. With relative positions, `runlocal` reached 72.3%
after its 600 steps (`--config.model.position=relative`).
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, demo=False)
  config = lm.get_config("runlocal" if arg.runlocal or arg.demo else None)
  config.task = "reverse"
  config.model.update(kind="encdec", norm="rmsnorm", mlp_activation="gelu", gated_mlp=True,
                      position="relative", dropout_rate=0.1, mlp_hidden_dropout=True,
                      init="lecun",
                      # T5.1.1: N(0, 1) embeddings, an untied output projection
                      # (lecun: logits O(1)), no depth scaling of residual outputs.
                      # Tied to a unit-variance table, the output would favour each
                      # input token at init (initial loss ~8 nats, not ln 384).
                      embed_init="unit", tie_embeddings=False, scale_residual_init=False,
                      # T5's queries are not scaled: the factor is in their init.
                      fold_query_scale=True)
  config.optim.update(name="adafactor", lr=1e-2, schedule="rsqrt", weight_decay=0.0,
                      clip_norm=0.0)
  if arg.runlocal or arg.demo:
    config.total_steps = 1500 if arg.demo else 600
    config.batch_size = 32
    config.seq_len = config.model.max_len = 16 if arg.demo else 8
    config.model.update(dropout_rate=0.0, position="learned")
    config.log_every = config.eval_every = config.checkpoint_every = 500 if arg.demo else 200
    # Adafactor's parameter-relative steps and the rsqrt decay suit long runs;
    # runs of seconds learn faster with AdamW and a short cosine.
    config.optim.update(name="adamw", lr=3e-3, schedule="cosine", warmup_steps=20,
                        clip_norm=1.0)
  return config
