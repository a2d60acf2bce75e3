r"""A small CNN on handwritten digits: two 3x3 conv + 2x2 max-pool stages, then a
dense layer, softmax cross-entropy.

8x8 digits shipped with scikit-learn (built into tfds locally), ~98% test
accuracy in ~20 s on 2 CPU cores:
  python -m bigjax.main --config=configs/cnn.py --workdir=/tmp/cnn_digits
28x28 MNIST from tfds, where it is prepared (bigjax never downloads: run
`tfds build mnist --file_format=array_record` where there is internet and
TensorFlow, which `tfds build` imports, is installed, or copy a data dir built
elsewhere; reading it needs no TensorFlow), ~99%:
  python -m bigjax.main --config=configs/cnn.py:mnist --workdir=/tmp/cnn_mnist
`runlocal` shortens either to seconds.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, mnist=False, runlocal=False)
  if arg.mnist:
    config = common.example_config("mnist", "classify", feature_key="image")
    config.total_steps = 3000
    config.batch_size = 128
  else:
    config = common.example_config("sklearn_toy/digits", "classify")
    config.total_steps = 1000
    config.batch_size = 64
  config.model = common.zoo_model("cnn", num_outputs=10, conv_features=(32, 64),
                                  hidden_dims=(128,), dropout_rate=0.1)
  config.optim = common.optim_config(name="adam", lr=2e-3, warmup_steps=50,
                                     weight_decay=0.0, b2=0.999, clip_norm=0.0)
  if arg.runlocal:
    config.total_steps = 40
    config.optim.warmup_steps = 5  # Within the 40 steps.
    config.log_every = config.eval_every = config.checkpoint_every = 20
  return config
