r"""MLP classifiers on data that ships with scikit-learn (built into tfds locally).

Variants (pick with the arg):
  binary: breast-cancer diagnosis from 30 measurements; one sigmoid logit trained
          with binary cross-entropy. 98.2% test accuracy, 12 s on 2 CPU cores:
    python -m bigjax.main --config=configs/mlp.py:variant=binary --workdir=/tmp/mlp_binary
  deep:   8x8 handwritten digits; three hidden layers with BatchNorm and dropout,
          softmax cross-entropy. 99.2% test accuracy, 13 s:
    python -m bigjax.main --config=configs/mlp.py:variant=deep --workdir=/tmp/mlp_deep
`runlocal` shortens either to a few seconds (smoke tests, Colab). The figures are
the README's Model zoo table (`python experiments/zoo.py --root=/tmp/zoo`).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="deep", runlocal=False)
  if arg.variant == "binary":
    config = common.example_config("sklearn_toy/breast_cancer", "binary", standardize=True)
    config.total_steps = 600
    config.batch_size = 32
    config.model = common.zoo_model("mlp", num_outputs=1, hidden_dims=(32,))
    config.optim = common.optim_config(name="adam", lr=1e-3, warmup_steps=0,
                                       schedule="constant", weight_decay=0.0, b2=0.999,
                                       clip_norm=0.0)
  elif arg.variant == "deep":
    config = common.example_config("sklearn_toy/digits", "classify")
    config.total_steps = 1500
    config.batch_size = 64
    config.model = common.zoo_model("mlp", num_outputs=10, hidden_dims=(256, 256, 128),
                                    batch_norm=True, dropout_rate=0.2)
    config.optim = common.optim_config(name="adamw", lr=3e-3, warmup_steps=50,
                                       weight_decay=1e-4, b2=0.999, clip_norm=0.0)
  else:
    raise ValueError(f"Unknown variant {arg.variant!r}; choose 'binary' or 'deep'.")
  if arg.runlocal:
    config.total_steps = 60
    config.log_every = config.eval_every = config.checkpoint_every = 30
  return config
