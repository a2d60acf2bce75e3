"""Helpers shared by the batch tests (tests/test_data.py, tests/test_mlm_batches.py):
each token task's examples, an LMBatches with small defaults, batch equality."""
import numpy as np

from bigjax import tasks
from bigjax.data import pipeline


# What each token task makes of a chunk (bigjax/tasks.py).
EXAMPLES = {"lm": tasks.next_token_examples(), "reverse": tasks.reversed_examples(),
            "mlm": tasks.masked_examples(0.15)}


def _lm(tokens, task="lm", **kw):
  args = dict(global_batch_size=8, seq_len=32, seed=0, examples=EXAMPLES[task])
  return pipeline.LMBatches(tokens, **{**args, **kw})


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
