r"""BERT-style encoder trained with masked-LM on the embedded Python-source
corpus: 15% of the bytes are chosen, 80% of those replaced by [MASK], 10% by a
random byte and 10% kept, and the model predicts the originals.

Positions are rotary, as in recent encoders, rather than BERT's learned table:
at this size, learned absolute positions took far longer to learn to read a
neighbouring token (tests/test_model_zoo.py's masked-pairs task stayed at chance
for 1,000 steps; rotary solved half of it in 500).

  python -m bigjax.main --config=configs/bert.py:runlocal --workdir=/tmp/bert_local  # ~15 s
  python -m bigjax.main --config=configs/bert.py:demo --workdir=/tmp/bert_demo  # ~1.5 min
BERT-base size (12 x 768) on an accelerator: drop `runlocal`.

`direction` fine-tunes for sequence classification, BERT's other use: a
classifier over the mean of the final hidden states (model.num_classes=2) tells
whether each chunk of source reads forwards or backwards. Both classes hold the
same bytes, so a model blind to their order stays at 50%. From the `runlocal`
masked-LM run above (~15 s; 85.9% validation accuracy after its 500 steps):
  python -m bigjax.main --config=configs/bert.py:direction,runlocal \
      --config.init_from.workdir=/tmp/bert_local --workdir=/tmp/bert_direction
Without init_from, the same run stays at chance: the pretraining is what it needs.
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, direction=False, runlocal=False, demo=False)
  config = lm.get_config(",".join(k for k in ("runlocal", "demo") if arg[k]))
  config.task = "mlm"
  config.sample_tokens = 0  # Masked-LM and direction draw no sample.
  config.model.update(kind="encoder", position="rotary", norm="layernorm",
                      mlp_activation="gelu", dropout_rate=0.1)
  if arg.runlocal or arg.demo:
    config.model.dropout_rate = 0.0  # Minutes of training on a large corpus: no overfitting.
  if arg.runlocal:
    config.total_steps = 150
    config.log_every = config.eval_every = config.checkpoint_every = 50
  if arg.direction:
    config.task = "direction"
    config.model.num_classes = 2
    config.eval_batches = max(config.eval_batches, 8)
    if arg.runlocal or arg.demo:
      config.update(total_steps=500, batch_size=32)
      config.log_every = config.eval_every = config.checkpoint_every = 250
      config.optim.update(lr=1e-3, warmup_steps=50)
    else:
      config.total_steps //= 4
  return config
