r"""Linear regression trained with plain SGD on mean squared error: diabetes
progression against body-mass index (column 2 of the diabetes data shipped with
scikit-learn, built into tfds locally). The learned slope (kernel) and intercept
(bias) match the closed-form least-squares solution; tests/test_model_zoo.py
checks them against numpy. ~10 s on 2 CPU cores:
  python -m bigjax.main --config=configs/linear_regression.py --workdir=/tmp/linreg
All ten measurements (multiple regression; slower to converge, as the features
are nearly collinear): --config.data.feature_columns="()" --config.total_steps=30000
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  # Standardised features make the least-squares problem well enough conditioned
  # for SGD; the lr decays to 0 so the last iterates settle on the optimum.
  config = common.example_config("sklearn_toy/diabetes", "regress", standardize=True,
                                 feature_columns=(2,))
  config.total_steps = 2000
  config.batch_size = 32
  config.log_every = 500
  config.eval_every = config.checkpoint_every = 1500
  config.model = common.zoo_model("linear", num_outputs=1, hidden_dims=(), init="zeros")
  config.optim = common.optim_config(name="sgd", lr=0.05, warmup_steps=0, schedule="linear",
                                     end_lr_factor=0.0, weight_decay=0.0, clip_norm=0.0)
  if arg.runlocal:
    config.total_steps = 100
    config.log_every = config.eval_every = config.checkpoint_every = 50
  return config
