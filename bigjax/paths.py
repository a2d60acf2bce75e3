"""Workdir path schemes, in one place. Local paths go through the OS; remote ones
("scheme://...") through etils.epath. Of the remote ones, buckets (gs://) also
get a lease (bucket_lease) and orbax's commit-file saves (checkpoint); other
schemes epath reads work unlocked (workdir_lock.UnlockedWorkdir)."""

BUCKET_PREFIX = "gs://"


def is_remote(path) -> bool:
  """A path written through etils.epath rather than the OS."""
  return "://" in str(path)


def is_bucket(path) -> bool:
  """A Cloud Storage path (gs://BUCKET/...)."""
  return str(path).startswith(BUCKET_PREFIX)
