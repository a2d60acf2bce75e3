"""Ways the survival tests damage a saved checkpoint step on disk."""
import os


def largest_file(step_dir) -> str:
  """The step's largest file: an array data file."""
  files = [os.path.join(parent, name) for parent, _, names in os.walk(step_dir)
           for name in names]
  return max(files, key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def flip_byte(path):
  """Inverts the middle byte (bit rot), which orbax restores without noticing."""
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
