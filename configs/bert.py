r"""BERT-style encoder trained with masked-LM on the embedded Python-source
corpus: 15% of the bytes are chosen, 80% of those replaced by [MASK], 10% by a
random byte and 10% kept, and the model predicts the originals.

  python -m bigjax.main --config=configs/bert.py:runlocal --workdir=/tmp/bert_local  # ~1 min
BERT-base size (12 x 768) on an accelerator: drop `runlocal`.
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = lm.get_config("runlocal" if arg.runlocal else None)
  config.task = "mlm"
  config.data.mask_rate = 0.15
  config.model.update(kind="encoder", position="learned", norm="layernorm",
                      mlp_activation="gelu", dropout_rate=0.1)
  if arg.runlocal:
    config.model.dropout_rate = 0.0
    config.total_steps = 150
    config.log_every = config.eval_every = config.checkpoint_every = 50
  return config
