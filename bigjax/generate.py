r"""Command line: generate text from a trained run's latest checkpoint.

  python -m bigjax.generate --workdir=/tmp/lm --prompt="def " --max_new_tokens=100 \
      [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]
  python -m bigjax.generate --workdir=/tmp/lm --prompt="def " --max_new_tokens=100 \
      --beam_size=4 --length_penalty=0.6

Reads WORKDIR/config.json (written by training) and the latest finished
checkpoint under WORKDIR/checkpoints, and prints the generated text (the new
tokens only, byte-tokenizer decoded) to stdout; notes go to stderr. Generation
stops at EOS or after --max_new_tokens. temperature 0 (the default) is greedy.
For an encoder-decoder run the prompt is the encoder input.
"""
import json
import math
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from etils import epath  # Local paths and gs:// alike.

# `configs/` sits next to `bigjax/`, as for bigjax.main.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigjax import recorded_config  # noqa: E402  (light: json and etils only)

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue (the encoder input for "
                              "encoder-decoder runs).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens (bytes) to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_BEAM = flags.DEFINE_integer("beam_size", 1, "> 1: beam search (temperature 0, top_k 0, top_p 1).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.6,
                                     "Beam search: GNMT length normalisation exponent.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir", "prompt"])


class GenerateError(Exception):
  """A problem with the command's input; the message says what to do."""


def load_config(workdir: str):
  import ml_collections

  if not epath.Path(workdir).is_dir():
    raise GenerateError(f"--workdir={workdir} does not exist. Point it at a training run's "
                        "directory (python -m bigjax.main --config=... --workdir=...).")
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise GenerateError(f"{path} not found: {workdir} is not a training run's directory "
                        "(training writes config.json there once it starts).")
  try:
    values = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise GenerateError(f"Cannot read {path}: {e}") from None
  return ml_collections.ConfigDict(recorded_config.fill_older(values))


def _mesh(config):
  """The run's mesh if it fits this machine's devices, else all devices on `data`
  (parameters replicated), with a note."""
  from bigjax import sharding

  try:
    return sharding.config_mesh(config)
  except ValueError as e:
    print(f"Note: the run's mesh does not fit here ({e}); using data=-1 instead.",
          file=sys.stderr)
    return sharding.make_mesh({"data": -1})


def load_model(workdir: str):
  """(config, setup, model) with the latest checkpoint's parameters."""
  from bigjax import checkpoint_reader, steps, tasks

  config = load_config(workdir)
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise GenerateError(f"No checkpoints in {workdir} ({ckpt_dir} does not exist): train "
                        "first, or wait for the run's first save.")
  generating = [name for name, task in tasks.REGISTRY.items() if task.generates]
  if config.task not in generating:
    raise GenerateError(f"{workdir} trained task={config.task!r}; generation needs a language "
                        f"model or an encoder-decoder (a task in {generating}).")
  try:
    setup = steps.make_setup(config, _mesh(config))
  except AttributeError as e:
    if not (e.args and isinstance(e.args[0], KeyError)):  # Not ConfigDict's missing key.
      raise
    missing = e.args[0].args[0]
    raise GenerateError(f"{workdir}/config.json has no setting {missing}: the run predates "
                        "it and bigjax.recorded_config does not know the value it used. Add "
                        "it to that config.json by hand (configs/ hold today's values).") from None
  # Read-only: a training run may still be writing (its unfinished save is not
  # listed), and the optimizer state is never read.
  reader = checkpoint_reader.CheckpointReader(workdir)
  try:
    if reader.latest_step() is None:
      raise GenerateError(f"No finished checkpoint in {ckpt_dir}: train first, or wait for "
                          "the run's first save.")
    # A damaged step is skipped (with a note) for the one before it.
    params, _, _ = reader.restore_latest_intact_params(
        setup.abstract_state, setup.state_shardings, lambda note: print(note, file=sys.stderr))
  finally:
    reader.close()
  return config, setup, setup.model(params)


def _check_finite(**settings):
  """NaN or Inf sampling settings would decode nothing, silently: refuse them."""
  for name, value in settings.items():
    if not math.isfinite(value):
      raise GenerateError(f"--{name}={value} is not a finite number; pass e.g. "
                          f"--{name}={flags.FLAGS[name].default}.")


def run(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, beam_size: int = 1, length_penalty: float = 0.6,
        seed: int = 0) -> str:
  """The generated text (new tokens only)."""
  from bigjax import decode
  from bigjax.data import tokenizer

  _check_finite(temperature=temperature, top_p=top_p, length_penalty=length_penalty)
  # Before loading the model: a bad prompt fails at once. Bytes of the command
  # line that are not utf-8 reach here as surrogate escapes and encode back to
  # themselves.
  ids = list(tokenizer.encode(prompt))
  if not ids:
    raise GenerateError("--prompt is empty; give at least one character.")
  config, setup, model = load_model(workdir)
  out = decode.generate(model, [ids], max_new_tokens=max_new_tokens,
                        max_len=int(config.model.max_len), temperature=temperature,
                        top_k=top_k, top_p=top_p, beam_size=beam_size,
                        length_penalty=length_penalty, eos_id=tokenizer.EOS_ID, seed=seed,
                        mesh=setup.mesh, rules=setup.rules)[0]
  return tokenizer.decode(out)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"Error: unexpected arguments {argv[1:]}; pass the prompt as --prompt=TEXT.")
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bigjax.checkpoint import CheckpointDamagedError
  from bigjax.config import ConfigError

  try:
    text = run(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
               temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
               beam_size=_BEAM.value, length_penalty=_LENGTH_PENALTY.value, seed=_SEED.value)
  # ConfigError (e.g. a checkpoint of another model) is a ValueError, as are the
  # settings decode rejects (lengths, top_p, beam_size, ...).
  except (GenerateError, ConfigError, CheckpointDamagedError, ValueError,
          FileNotFoundError) as e:
    sys.exit(f"Error: {e}")
  print(text)


if __name__ == "__main__":
  app.run(main)
