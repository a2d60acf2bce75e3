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
  """Returns int32 ids of `text`, one per byte. bytes (or bytearray) are taken as
  is, so any byte string, valid utf-8 or not, is kept exactly: decode_bytes
  gives it back. str is utf-8 encoded with errors="surrogateescape": the lone
  surrogates U+DC80-U+DCFF by which Python carries undecodable bytes of a
  command line or file name (os.fsdecode) become those bytes again."""
  if isinstance(text, str):
    data = text.encode("utf-8", errors="surrogateescape")
  elif isinstance(text, (bytes, bytearray)):
    data = bytes(text)
  else:  # bytes(5) is five zero bytes, bytes(an int64 array) its raw memory.
    raise TypeError(f"tokenizer.encode takes text as str or bytes, got "
                    f"{type(text).__name__}: {text!r:.80}.")
  return np.frombuffer(data, np.uint8).astype(np.int32) + OFFSET


def decode_bytes(ids) -> bytes:
  """The bytes of `ids`, dropping special ids (and any id past the byte range:
  MASK_ID, or what a model with a padded vocabulary may emit). Inverts `encode`
  exactly: decode_bytes(encode(b)) == b for any bytes b."""
  ids = np.asarray(ids, dtype=np.int64).ravel()
  ids = ids[(ids >= OFFSET) & (ids < VOCAB_SIZE)]
  return (ids - OFFSET).astype(np.uint8).tobytes()


def decode(ids) -> str:
  """The text of `ids`: decode_bytes(ids) read as utf-8. Bytes that are not
  valid utf-8 each become U+FFFD rather than raising, since sampled bytes need
  not be valid, so only valid text survives encode -> decode unchanged; use
  decode_bytes to get any bytes back exactly."""
  return decode_bytes(ids).decode("utf-8", errors="replace")
