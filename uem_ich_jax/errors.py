"""The base of the project's input errors, so the CLI can report them all alike."""


class InputError(ValueError):
  """Bad input at a boundary (file, dataset, config); the message names it and the reason."""
