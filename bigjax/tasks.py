"""Tasks: what a run learns, one object each, in one registry.

A task owns its data (train and eval batches from config.data), how a batch
feeds the model and which model kinds it trains, its loss and metrics, its
evaluation summary and the lines the end-of-run report prints. The steps, the
loop and the command lines ask `tasks.get(config.task)`; none of them branches
on a task's name.

Adding a task: subclass TokenTask (batches cut from a token corpus) or
ExampleTask ((features, label) examples), or Task itself for other data, and
`register` an instance. tests/test_task_registry.py adds one from a test file.
"""
import dataclasses
import math
from typing import Any

import numpy as np

from bigjax import config as config_lib, losses
from bigjax.data import examples, pipeline, tokenizer
from bigjax.models import zoo


@dataclasses.dataclass
class TaskData:
  """A run's data, this process's rows only."""
  train: Any  # .batch(step) -> dict of numpy arrays: a pure function of the step.
  eval: list  # Eval batches (dicts of numpy arrays), the same every call.
  example_shape: tuple | None = None  # One example's feature shape (zoo models).
  stats: dict = dataclasses.field(default_factory=dict)  # E.g. the corpus' unigram entropy.


def _fail(field: str, problem: str, fix: str):
  raise config_lib.ConfigError(f"config.{field}: {problem} {fix}")


class Task:
  """The base: batches with "inputs", "targets" and "weights"; `loss` is a
  losses.pointwise_loss kind; accuracy wherever that loss has one."""
  name: str = ""
  model_kinds: tuple = ()
  loss: str = "softmax"
  generates: bool = False  # bigjax.generate decodes text from its models.

  def validate(self, config) -> None:
    """Task-specific config checks (ConfigError naming the field)."""

  def load_data(self, config, process_index: int, process_count: int) -> TaskData:
    raise NotImplementedError

  def throughput(self, config) -> tuple[int, str]:
    """(items per step, their unit) for the logged rate."""
    return config.batch_size, "examples"

  def loss_chunk_len(self, config) -> int:
    """Positions per chunk of the output projection + softmax loss (0: whole)."""
    return 0

  def forward(self, model, batch, rng, logits: bool = True):
    """The model's outputs for a batch; with logits=False the final hidden
    states that its output projection (`model.embedder.logits`) reads."""
    return (model if logits else model.features)(batch["inputs"], rng=rng)

  def per_target_loss(self, model, batch, rng, loss_chunk_len: int = 0):
    """(loss, correct-or-None) per target of the batch."""
    if loss_chunk_len:
      features = self.forward(model, batch, rng, logits=False)
      return losses.chunked_softmax_ce(model.embedder.logits, features, batch["targets"],
                                       loss_chunk_len)
    return losses.pointwise_loss(self.loss, self.forward(model, batch, rng), batch["targets"])

  def eval_sums(self, batch) -> dict:
    """Sums over an eval batch (jnp, traced) that eval_summary needs beyond the
    loss, weight and correct predictions."""
    return {}

  def eval_summary(self, sums: dict) -> dict:
    """Eval metrics from the summed loss, weight and correct predictions."""
    weight = max(float(sums["weight_sum"]), 1.0)
    out = {"eval_loss": float(sums["loss_sum"]) / weight}
    if "correct_sum" in sums:
      out["eval_accuracy"] = float(sums["correct_sum"]) / weight
    return out

  def report(self, config, eval_metrics: dict, stats: dict, setup, state) -> list[str]:
    """What the end of a run prints (process 0)."""
    return ["Final evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items())]


# --------------------------------------------------------------------------
# Token tasks: chunks of a byte-tokenised corpus.
# --------------------------------------------------------------------------


def next_token_examples() -> pipeline.ChunkExamples:
  """inputs = chunk[:-1], targets = chunk[1:]."""
  def make(chunk, rng):
    return {"inputs": chunk[:-1], "targets": chunk[1:],
            "weights": np.ones(chunk.size - 1, np.float32)}
  return pipeline.ChunkExamples(make)


def reversed_examples() -> pipeline.ChunkExamples:
  """The encoder-decoder contract: encoder_inputs = chunk[:seq_len], targets =
  encoder_inputs reversed, decoder_inputs = [BOS] + targets[:-1]."""
  def make(chunk, rng):
    src = chunk[:-1]
    rev = src[::-1].copy()
    dec = np.concatenate([[tokenizer.BOS_ID], rev[:-1]]).astype(np.int32)
    return {"encoder_inputs": src, "decoder_inputs": dec, "targets": rev,
            "weights": np.ones(src.size, np.float32)}
  return pipeline.ChunkExamples(make)


def masked_examples(mask_rate: float) -> pipeline.ChunkExamples:
  """BERT's recipe on chunk[:seq_len]: each byte position is chosen with
  probability mask_rate; a chosen one becomes MASK_ID (80%), a uniformly random
  byte (10%) or stays (10%), so the model cannot tell from the input which
  unmasked tokens it is graded on. Specials (EOS, ...) are never chosen;
  weights are 1.0 where chosen, at least once per row with a byte in it."""
  if not 0 < mask_rate < 1:
    raise ValueError(f"config.data.mask_rate={mask_rate} must be in (0, 1) for a masked "
                     "LM: set it to the fraction of tokens to predict (BERT: 0.15).")

  def make(chunk, rng):
    src = chunk[:-1]
    eligible = (src >= tokenizer.OFFSET) & (src < tokenizer.VOCAB_SIZE)
    draw, kind = rng.random((2, src.size))
    chosen = eligible & (draw < mask_rate)
    if not chosen.any() and eligible.any():
      # An empty row would waste its compute; pick one position instead. (A row
      # of only specials has none to pick and keeps all-zero weights.)
      chosen[rng.choice(np.flatnonzero(eligible))] = True
    inputs = src.copy()
    inputs[chosen & (kind < 0.8)] = tokenizer.MASK_ID
    rand = chosen & (kind >= 0.8) & (kind < 0.9)
    inputs[rand] = rng.integers(tokenizer.OFFSET, tokenizer.VOCAB_SIZE, rand.sum())
    return {"inputs": inputs, "targets": src, "weights": chosen.astype(np.float32)}
  return pipeline.ChunkExamples(make, random=True)


def direction_examples() -> pipeline.ChunkExamples:
  """chunk[:seq_len] forwards (target 0) or backwards (target 1), at random. Both
  have the same bytes, so only the order tells them apart."""
  def make(chunk, rng):
    backwards = rng.random() < 0.5
    src = chunk[:-1]
    return {"inputs": (src[::-1] if backwards else src).copy(),
            "targets": np.int32(backwards), "weights": np.float32(1.0)}
  return pipeline.ChunkExamples(make, random=True)


class TokenTask(Task):
  """Batches of config.seq_len-token chunks of config.data's text corpus."""
  vocab_needed: int = tokenizer.VOCAB_SIZE
  metric_unit = "bits per byte"  # What eval_bits_per_byte counts, for the report.
  sample_prompt: str | None = None  # What the end-of-run sample continues; None: no sample.

  def chunk_examples(self, config) -> pipeline.ChunkExamples:
    raise NotImplementedError

  def validate(self, config):
    if config.model.vocab_size < self.vocab_needed:
      _fail("model.vocab_size", f"{config.model.vocab_size} is smaller than the "
            f"{self.vocab_needed} ids task={self.name!r} uses.", f"Use at least "
            f"{self.vocab_needed}.")
    config_lib.non_negative_ints(config, "sample_tokens")
    if config.sample_tokens and self.sample_prompt is None:
      _fail("sample_tokens", f"task={self.name!r} draws no sample at the end of training.",
            "Set sample_tokens=0, and decode the trained run with python -m bigjax.generate.")

  def load_data(self, config, process_index, process_count):
    d = config.data
    split = lambda s: pipeline.token_array(d.dataset, s, d.data_dir, d.text_key)
    kwargs = dict(global_batch_size=config.batch_size, seq_len=config.seq_len,
                  examples=self.chunk_examples(config), process_index=process_index,
                  process_count=process_count)
    train = pipeline.LMBatches(split(d.train_split), seed=config.seed,
                               name=f"Split {d.train_split!r} of {d.dataset!r}", **kwargs)
    evals = pipeline.eval_batches(split(d.eval_split), num_batches=config.eval_batches,
                                  name=f"Split {d.eval_split!r} of {d.dataset!r}", **kwargs)
    stats = pipeline.token_stats(d.dataset, d.train_split, d.data_dir, d.text_key)
    return TaskData(train, evals, None, stats)

  def throughput(self, config):
    return config.batch_size * config.seq_len, "tokens"

  def loss_chunk_len(self, config):
    return config.loss_chunk_len

  def eval_sums(self, batch):
    # The graded targets that are bytes: EOS and the other specials are graded
    # (the model must predict where a document ends) but are not bytes of the text.
    is_byte = batch["targets"] >= tokenizer.OFFSET
    return {"byte_sum": (batch["weights"] * is_byte).astype("float32").sum()}

  def eval_summary(self, sums):
    out = super().eval_summary(sums)
    out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    # Bits per byte of text: the summed loss over the bytes graded, as for
    # published byte-level figures (not per token: EOS is a token, not a byte).
    out["eval_bits_per_byte"] = (float(sums["loss_sum"]) / math.log(2)
                                 / max(float(sums["byte_sum"]), 1.0))
    return out

  def report(self, config, eval_metrics, stats, setup, state):
    bpb = eval_metrics.get("eval_bits_per_byte")
    if bpb is None:  # No evaluation ran.
      return []
    return [f"Validation {self.metric_unit}: {bpb:.3f} (unigram entropy of the corpus: "
            f"{stats['unigram_entropy_bits']:.3f} bits/byte)"]


class NextToken(TokenTask):
  name, model_kinds, generates = "lm", ("decoder",), True
  sample_prompt = "def "  # What the end-of-run sample (config.sample_tokens) continues.

  def validate(self, config):
    super().validate(config)
    # Checked here, not when the sample is drawn: that is after all the training.
    prompt_len = len(tokenizer.encode(self.sample_prompt))
    sample_tokens = config.sample_tokens
    if sample_tokens and prompt_len + sample_tokens > config.model.max_len:
      _fail("sample_tokens", f"{sample_tokens} tokens after the {prompt_len}-token prompt "
            f"{self.sample_prompt!r} exceed model.max_len={config.model.max_len}.",
            f"Set sample_tokens <= {config.model.max_len - prompt_len}, or 0 for no sample.")

  def chunk_examples(self, config):
    return next_token_examples()

  def report(self, config, eval_metrics, stats, setup, state):
    lines = super().report(config, eval_metrics, stats, setup, state)
    # Sampling runs sharded computations that every process would have to join;
    # multi-process runs sample afterwards with `python -m bigjax.generate`.
    import jax
    from bigjax import decode  # Decoding sits above the tasks; only the report needs it.
    if config.sample_tokens and jax.process_count() > 1:
      lines.append("No sample in a multi-process run: python -m bigjax.generate "
                   "--workdir=... draws one from its checkpoint.")
    elif config.sample_tokens:
      prompt = self.sample_prompt
      out = decode.sample(setup.model(state.params), [list(tokenizer.encode(prompt))],
                          max_new_tokens=config.sample_tokens,
                          max_len=config.model.max_len, temperature=0.7, seed=config.seed)[0]
      lines.append("Sample:\n" + prompt + tokenizer.decode(out))
    return lines


class Reverse(TokenTask):
  """Output each chunk backwards: an encoder-decoder reads the chunk."""
  name, model_kinds, generates = "reverse", ("encdec",), True

  def chunk_examples(self, config):
    return reversed_examples()

  def forward(self, model, batch, rng, logits=True):
    fn = model if logits else model.features
    return fn(batch["encoder_inputs"], batch["decoder_inputs"], rng=rng)


class MaskedLM(TokenTask):
  name, model_kinds = "mlm", ("encoder",)
  vocab_needed = tokenizer.MLM_VOCAB_SIZE  # The bytes' ids plus [MASK].
  metric_unit = "bits per masked byte"

  def validate(self, config):
    super().validate(config)
    if "mask_rate" not in config.data:
      _fail("data.mask_rate", "is missing.", "Set it, e.g. 0.15 (BERT's; see configs/bert.py).")
    if not 0 < config.data.mask_rate < 1:
      _fail("data.mask_rate", f"{config.data.mask_rate} is outside (0, 1).",
            "Use e.g. 0.15 (BERT's).")

  def chunk_examples(self, config):
    return masked_examples(config.data.mask_rate)


class Direction(TokenTask):
  """Sequence classification: is each chunk of the corpus forwards or backwards?
  An encoder with a classifier head (model.num_classes=2) reads the chunk."""
  name, model_kinds = "direction", ("encoder",)

  def validate(self, config):
    super().validate(config)
    if config.model.num_classes != 2:
      _fail("model.num_classes", f"task='direction' has 2 classes (forwards, backwards), "
            f"got {config.model.num_classes}.", "Set model.num_classes=2.")

  def chunk_examples(self, config):
    return direction_examples()

  def forward(self, model, batch, rng, logits=True):
    return model.classify(batch["inputs"], rng=rng)

  def loss_chunk_len(self, config):
    return 0  # One prediction per row: no vocabulary projection to chunk.

  def eval_sums(self, batch):
    return {}

  def eval_summary(self, sums):
    return Task.eval_summary(self, sums)  # Loss and accuracy; no bits per byte.

  def report(self, config, eval_metrics, stats, setup, state):
    if "eval_accuracy" not in eval_metrics:  # No evaluation ran.
      return []
    return [f"Validation accuracy: {eval_metrics['eval_accuracy']:.1%} (chance: 50%; "
            "the two classes hold the same bytes)"]


# --------------------------------------------------------------------------
# Example tasks: (features, label) rows held in memory, for the zoo models.
# --------------------------------------------------------------------------


class ExampleTask(Task):
  model_kinds = zoo.KINDS

  def check_labels(self, config, y) -> str | None:
    """What is wrong with labels `y` for this task and config (None: nothing).
    A label the loss cannot take gives a NaN or meaningless loss, not an error."""
    if y.dtype.kind == "f" and not np.isfinite(y).all():
      return f"holds {np.size(y) - np.isfinite(y).sum()} NaN or infinite labels"
    return None

  def load_data(self, config, process_index, process_count):
    d = config.data
    x_train, y_train, x_eval, y_eval = examples.load_train_eval(
        d.dataset, d.train_split, d.eval_split, data_dir=d.data_dir,
        feature_key=d.feature_key, label_key=d.label_key,
        feature_columns=d.feature_columns, standardize_features=d.standardize)
    for split, y in ((d.train_split, y_train), (d.eval_split, y_eval)):
      problem = self.check_labels(config, y)
      if problem:
        raise config_lib.DataError(
            f"Split {split!r} of dataset {d.dataset!r}: label {d.label_key!r} (config.data."
            f"label_key) {problem}.")
    shard = dict(global_batch_size=config.batch_size, process_index=process_index,
                 process_count=process_count)
    train = examples.ExampleBatches(x_train, y_train, seed=config.seed,
                                    name=f"Split {d.train_split!r} of {d.dataset!r}", **shard)
    return TaskData(train, examples.eval_batches(x_eval, y_eval, **shard),
                    tuple(x_train.shape[1:]))


class Classify(ExampleTask):
  name, loss = "classify", "softmax"

  def check_labels(self, config, y):
    n = config.model.num_outputs
    if y.dtype.kind not in "iu":
      return (f"is {y.dtype}, not integer class ids. Point config.data.label_key at class "
              "ids 0..num_classes-1, or use task='regress' for real-valued targets")
    if y.min() < 0:
      return (f"holds class id {y.min()}; ids must be 0..num_classes-1. Map the classes "
              "to 0..num_classes-1")
    if y.max() >= n:
      return (f"holds class ids up to {y.max()}, but config.model.num_outputs={n} gives "
              f"the model classes 0..{n - 1} only. Set --config.model.num_outputs="
              f"{y.max() + 1} (the number of classes)")
    return None


class OneOutputTask(ExampleTask):
  def validate(self, config):
    if config.model.num_outputs != 1:
      _fail("model.num_outputs", f"task={self.name!r} predicts one value per example, "
            f"got num_outputs={config.model.num_outputs}.", "Set model.num_outputs=1.")


class Binary(OneOutputTask):
  name, loss = "binary", "sigmoid"

  def check_labels(self, config, y):
    bad = ~np.isin(y, (0, 1))
    if bad.any():
      n = len(np.unique(y))
      return (f"holds {y[bad][0].item()!r} (of {n} distinct values); task='binary' takes "
              "labels 0 and 1 only. Map the two classes to 0/1, or use task='classify' "
              "with model.num_outputs set to the number of classes")
    return None


class Regress(OneOutputTask):
  name, loss = "regress", "mse"  # Any finite target: ExampleTask.check_labels.


# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------

REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  """Makes `task` available as config.task = task.name."""
  if task.loss not in losses.LOSSES:
    raise ValueError(f"Task {task.name!r}: loss {task.loss!r} is not one of {losses.LOSSES}.")
  REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  if name not in REGISTRY:
    _fail("task", f"unknown task {name!r}.", f"Choose one of {tuple(REGISTRY)}.")
  return REGISTRY[name]


for _task in (NextToken(), Reverse(), MaskedLM(), Direction(), Classify(), Binary(),
              Regress()):
  register(_task)
