"""Data: a byte-level tokenizer, tfds corpora read without TensorFlow, and a
step-indexed, per-host-sharded batch pipeline on grain."""
