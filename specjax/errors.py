"""One exception type for mistakes in what the user gave us.

Jobs catch it at the top and print its message alone: the message names the file,
line, field or value at fault, so a traceback from deep inside JAX adds nothing.
"""


class SpecjaxError(ValueError):
  """A user's input (file, config field, argument) is wrong; the message says which and why."""
