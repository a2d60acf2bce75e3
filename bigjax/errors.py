"""The error every layer raises for a setting it cannot use. A leaf module, so
that the models can raise it without importing the config machinery."""


class ConfigError(ValueError):
  """A config field (or --workdir) this run cannot use; the message names the
  field and the fix, and the command line prints it as one 'Invalid config' line."""
