"""Byte-level tokenizer: nothing to train, nothing to download, any bytes in.

Ids 0-2 are special (pad, bos, eos); byte b is id b + 3, so VOCAB_SIZE = 259.
The masked-LM task adds MASK_ID = 259 past the byte range, so its models need
MLM_VOCAB_SIZE = 260 ids; texts never contain it and `decode` drops it.
"""
import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
OFFSET = 3  # Id of byte 0.
VOCAB_SIZE = 256 + OFFSET
# Past the byte range rather than a fourth special id below it, so byte ids, the
# token cache and VOCAB_SIZE stay the same for every other task.
MASK_ID = VOCAB_SIZE
MLM_VOCAB_SIZE = MASK_ID + 1  # Smallest vocabulary that holds MASK_ID.


def encode(text: str | bytes) -> np.ndarray:
  """Returns int32 ids of `text`: str is utf-8 encoded, bytes are taken as is
  (so text that is not valid utf-8 survives a round trip)."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, np.uint8).astype(np.int32) + OFFSET


def decode(ids) -> str:
  """Returns the text of `ids`, dropping special ids (and any id past the byte
  range: MASK_ID, or what a model with a padded vocabulary may emit). Invalid
  utf-8 turns into U+FFFD rather than raising, since sampled bytes need not be
  valid."""
  ids = np.asarray(ids, dtype=np.int64).ravel()
  ids = ids[(ids >= OFFSET) & (ids < VOCAB_SIZE)]
  return (ids - OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
