r"""Command line: train (or resume) a run from a config file.

  python -m bigjax.main --config=configs/lm.py:runlocal --workdir=/tmp/run \
      --config.model.num_layers=4 --config.mesh.data=2

The workdir identifies the run: the same command resumes it from its latest
checkpoint. Unknown or mistyped --config.* keys are errors (the config is locked).
"""
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# `configs/` sits next to `bigjax/`; config files import `configs.common`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:runlocal.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def _print_router_metrics(workdir: str):
  """The last logged router metrics of each MoE layer, one line per layer."""
  from bigjax import metrics

  rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if any(k.startswith("moe/") for k in r)]
  if not rows:
    return
  last = rows[-1]
  layers = sorted({k.rsplit("/", 1)[0] for k in last if k.startswith("moe/")
                   and "/load/" not in k})
  print(f"Router metrics at step {last['step']}:")
  for layer in layers:
    load = [last[k] for k in sorted(last) if k.startswith(layer + "/load/")]
    print(f"  {layer[4:]}: aux={last[layer + '/aux_loss']:.3f} "
          f"z_loss={last[layer + '/z_loss']:.3f} dropped={last[layer + '/dropped']:.3f} "
          f"entropy={last[layer + '/router_entropy']:.3f} "
          f"load=[{' '.join(f'{x:.2f}' for x in load)}]")


def summarize(result, config, workdir: str):
  """Prints what a researcher checks first: bits/byte vs unigram entropy and a
  sample for language models, the final evaluation for the others."""
  import jax
  from bigjax import decode, report
  from bigjax.data import pipeline, tokenizer

  if jax.process_index() != 0:
    return
  png = report.plot_loss_curve(workdir)
  print(f"Loss curve: {png}")
  if config.task not in ("lm", "reverse", "mlm"):  # Examples: the eval metrics say it all.
    print("Final evaluation: " + ", ".join(f"{k}={v:.4f}"
                                           for k, v in result.eval_metrics.items()))
    return
  d = config.data
  entropy = pipeline.unigram_entropy_bits(
      pipeline.token_array(d.dataset, d.train_split, d.data_dir, d.text_key))
  bpb = result.eval_metrics.get("eval_bits_per_byte")
  if bpb is not None:
    what = "bits per masked byte" if config.task == "mlm" else "bits per byte"
    print(f"Validation {what}: {bpb:.3f} (unigram entropy of the corpus: "
          f"{entropy:.3f} bits/byte)")
  _print_router_metrics(workdir)
  # Sampling runs sharded computations that every process would have to join;
  # multi-process runs sample afterwards with `python -m bigjax.generate`.
  if config.sample_tokens and config.model.kind == "decoder" and jax.process_count() == 1:
    prompt = "def "
    model = result.task.model(result.state.params)
    out = decode.sample(model, [list(tokenizer.encode(prompt))],
                        max_new_tokens=config.sample_tokens, max_len=config.model.max_len,
                        temperature=0.7, seed=config.seed)[0]
    print("Sample:\n" + prompt + tokenizer.decode(out))


def main(argv):
  del argv
  from bigjax import config as config_lib, train

  # Library chatter (orbax logs every save at INFO) stays out of the way;
  # bigjax prints what a researcher needs on process 0.
  absl_logging.set_verbosity(absl_logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    result = train.run(config, workdir)
  except config_lib.ConfigError as e:  # Bad input: the message says what to fix.
    sys.exit(f"Invalid config: {e}")
  except train.NonFiniteError as e:  # nan_policy="halt"
    sys.exit(f"Halted: {e}")
  if not result.preempted:
    summarize(result, config, workdir)


if __name__ == "__main__":
  app.run(main)
