"""One error path for the command-line tools (`train.sft`, `train.generate`, ...).

Bad input from the user (a config value, a file, data, a checkpoint, the network, a missing optional
dependency) raises `UserError` with one sentence that names the field as the user typed it, the value,
and what is valid. `exit_on_user_error` prints that sentence on one line and exits with status 2. Any
other exception is a bug and keeps its traceback. `--verbose` or `JLORA_VERBOSE=1` shows the traceback
for user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys

# One definition for the library and the CLIs: jlora raises it for bad files and values (it is a
# ValueError), and every CLI reports it here.
from jlora.errors import UserError

__all__ = ["UserError", "VERBOSE_ENV", "exit_on_user_error", "first_line", "verbose_requested"]

VERBOSE_ENV = "JLORA_VERBOSE"


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`: enough of a library's error to quote inside ours."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def verbose_requested(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def exit_on_user_error(verbose: bool = False):
  """Turns a `UserError` (and the standard library's plain input errors) into `error: ...` + exit 2."""
  try:
    yield
  except (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
  ) as e:
    if verbose:
      raise
    message = " ".join(str(e).split())  # one line, whatever the message held
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
