"""One error path for the command-line tools (`train.sft`, `train.generate`, `train.launch`, ...).

Bad input from the user (a config value, a file, data, a checkpoint, the network, a missing optional
dependency) raises `UserError` with one sentence that names the field as the user typed it, the value,
and what is valid. `exit_on_user_error` prints that sentence on one line and exits with status 2. The
environment gets the same treatment: a full disk (`ENOSPC`, wherever a library buries it), a
read-only or unreadable path, and a signal (exit 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).
Any other exception is a bug and keeps its traceback. `--verbose` or `JLORA_VERBOSE=1` shows the
traceback for user errors too, and lets library logs (orbax, absl, hub retries) through.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

# One definition for the library and the CLIs: jlora raises it for bad files and values (it is a
# ValueError), and every CLI reports it here.
from jlora.errors import UserError

__all__ = [
  "OneLineParser",
  "Stopped",
  "UserError",
  "VERBOSE_ENV",
  "closest_first",
  "disk_full_error",
  "exit_on_user_error",
  "first_line",
  "is_disk_full",
  "naming",
  "quiet_libraries",
  "verbose_requested",
  "writing",
]

VERBOSE_ENV = "JLORA_VERBOSE"
# Loggers of libraries that write to the terminal on their own (INFO chatter, retries, stack dumps).
NOISY_LOGGERS = (
  "absl",
  "orbax",
  "jax",
  "datasets",
  "huggingface_hub",
  "transformers",
  "urllib3",
  "filelock",
  "fsspec",
)
# How a full disk reads once a library (orbax, tensorstore, safetensors' Rust) has re-worded it.
DISK_FULL_TEXT = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Stopped(BaseException):
  """A signal (SIGINT / SIGTERM) stopped the program at a point where nothing more can be saved.

  A BaseException like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

  def __init__(self, signum: int, what: str = ""):
    self.signum = signum
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name}{f' {what}' if what else ''}")


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`: enough of a library's error to quote inside ours."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def verbose_requested(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def closest_first(name: str, valid: Iterable[str]) -> list[str]:
  """`valid`, sorted, with the names closest to `name` (difflib) moved to the front."""
  valid = sorted(set(valid))
  initials = "".join(word[:1] for word in name.split("_"))  # learning_rate -> lr
  close = [v for v in valid if v == initials and v != name]
  close += [v for v in difflib.get_close_matches(name, valid, n=3, cutoff=0.5) if v not in close]
  return close + [v for v in valid if v not in close]


def quiet_libraries(verbose: bool = False) -> None:
  """Keeps library logs (orbax's per-file INFO lines and error dumps, absl, hub retries) off the
  user's terminal: our own messages say what happened. `--verbose` lets them through."""
  level = logging.INFO if verbose else logging.CRITICAL
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  with contextlib.suppress(ImportError):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.FATAL)
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorstore / XLA C++ logs


# --------------------------------------------------------------------------- disk full


def is_disk_full(error: BaseException | None) -> bool:
  """True if `error`, or an exception it was raised from, is a full disk (or quota)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      return True
    if any(text in str(error).lower() for text in DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def _existing_parent(path: Path) -> Path:
  path = Path(path).absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def _size(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def disk_full_error(path, needed_bytes: int | None = None, kept: str = "") -> UserError:
  """The one line for a full disk: the path, the space needed and free, what is intact."""
  free = shutil.disk_usage(_existing_parent(Path(path))).free
  need = f"needs about {_size(needed_bytes)}, " if needed_bytes else ""
  kept = f"{kept}; " if kept else ""
  return UserError(
    f"disk full: could not write {path} ({need}{_size(free)} free there); {kept}"
    "free some space and rerun the same command to resume."
  )


@contextlib.contextmanager
def writing(path, needed_bytes: int | None = None, kept: str = ""):
  """Turns a full disk while writing `path` (whatever the library made of ENOSPC) into one line."""
  try:
    yield
  except Exception as e:
    if is_disk_full(e):
      raise disk_full_error(path, needed_bytes, kept) from e
    raise


@contextlib.contextmanager
def naming(what: str, kinds: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)):
  """Re-raises a library's error about an input as a UserError that starts with `what`: the flag
  and value as the user typed them (`--model 'x'`), so the line says which input was wrong."""
  try:
    yield
  except UserError as e:
    if str(e).startswith(what):
      raise
    raise UserError(f"{what}: {e}") from e
  except kinds as e:
    if isinstance(e, OSError) and is_disk_full(e):
      raise
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # no repr quotes
    message = message or type(e).__name__
    raise UserError(f"{what}: {message}") from e


# --------------------------------------------------------------------------- the exit path


class OneLineParser(argparse.ArgumentParser):
  """argparse, but a usage error is one `error: ...` line and exit 2, like every other user error
  (no usage block first: the line names the flag and what is valid)."""

  def error(self, message: str):
    _report(message, 2)


def _os_error_line(e: OSError) -> str:
  if is_disk_full(e):
    return str(disk_full_error(e.filename or ".", None))
  if e.filename is not None and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return str(e)


class StopNow(SystemExit):
  """The exit a second signal asks for: `run_cli` ends the process without waiting for anyone."""


def run_cli(main) -> None:
  """A command's `if __name__ == "__main__"`: `main()`, except that after a second signal the
  process ends at once. Threads still inside a library's save (orbax's) are abandoned rather
  than joined at shutdown, where they would print their own traceback under our one line; what
  they were writing is a temporary directory the rerun ignores."""
  try:
    main()
  except StopNow as e:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.code)


def _report(message: str, status: int, exit_type: type[SystemExit] = SystemExit) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, whatever it held
  sys.stderr.flush()
  raise exit_type(status)


@contextlib.contextmanager
def exit_on_user_error(verbose: bool = False):
  """Turns a `UserError`, a bad path, a full disk or a signal into `error: ...` and its status."""
  quiet_libraries(verbose)
  try:
    yield
  except (UserError, OSError) as e:
    if verbose:
      raise
    _report(_os_error_line(e) if isinstance(e, OSError) else str(e), 2)
  except Stopped as e:
    message = f"{e}; rerun the same command to resume from the last checkpoint."
    _report(message, 128 + e.signum, StopNow)
  except KeyboardInterrupt:
    _report("interrupted (SIGINT); rerun the same command to resume.", 128 + signal.SIGINT)
  except Exception as e:
    if is_disk_full(e) and not verbose:  # a full disk deep inside a library's own error type
      _report(f"disk full ({first_line(e, 200)}); free some space and rerun to resume.", 2)
    raise
