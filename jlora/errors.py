"""The one exception class for errors caused by the user's input.

`UserError` means: a value, a file or a directory the user gave is wrong, and the message (one
sentence naming the field or path as the user gave it, the value, and what is valid) is all they
need. The command-line tools (`train/errors.py`) print it on one line and exit with status 2, with
no traceback; any other exception is a bug and keeps its traceback. It subclasses `ValueError`, so
library callers that catch `ValueError` for bad arguments keep working.
"""


class UserError(ValueError):
  """Bad input from the user (a config value, a file, data): reported in one line, no traceback."""


def read_json(path) -> object:
  """A user's JSON file, parsed; malformed JSON is a `UserError` naming the file and position."""
  import json
  from pathlib import Path

  text = Path(path).read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(
      f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix or recreate it."
    ) from e
