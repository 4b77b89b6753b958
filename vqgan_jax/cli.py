"""What every command shares: flag parsing, quiet logs and one error style.

`cli.run(main)` replaces `absl.app.run(main)` in every entry point:
  * a user error (a bad config key or value, a missing file or checkpoint, a malformed
    flag) ends in one line, `error: <what to change>`, and exit code 2; the traceback is
    printed only with `--verbosity=1` (or higher);
  * logs show this project's messages (config summary, one line per log interval, where
    outputs go) and warnings; the INFO chatter of orbax, clu, grain, absl and TensorFlow
    comes back with `--verbosity=1`.
"""

import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from absl import app, flags
from absl import logging as absl_logging

EXIT_USAGE = 2
_PROJECT_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UsageError(ValueError):
  """A flag combination that cannot work; the message names the flag."""


def user_error_types():
  """Exceptions that are the user's to fix: they end in one `error:` line."""
  return (ValueError, FileNotFoundError, NotADirectoryError, KeyError, FloatingPointError,
          app.UsageError, flags.Error)


def _message(error: BaseException) -> str:
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = str(text).replace("\\n", " ").strip()
  return " ".join(text.split()) or type(error).__name__


def _read_only_notice(record: logging.LogRecord) -> bool:
  """orbax's warnings that a manager opened read-only (as every loader opens one) changes
  its save options: expected, not something for the user to act on."""
  return ("orbax" in (record.pathname or "") and record.levelno == logging.WARNING
          and ("read_only=True" in str(record.msg) or "read only" in str(record.msg)))


def _own_record(record: logging.LogRecord) -> bool:
  """Records this project logged (the root logger from our files) or warnings."""
  if _read_only_notice(record):
    return False
  if record.levelno >= logging.WARNING:
    return True
  path = os.path.abspath(record.pathname or "")
  in_project = path.startswith(_PROJECT_DIRS[0]) or (
      os.path.dirname(path) == _PROJECT_DIRS[1])
  return in_project and record.name in ("root", "absl")


class _Quiet(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return _own_record(record)


def verbose() -> bool:
  return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1


def configure_logging() -> None:
  """INFO from this project, warnings from everyone; everything with --verbosity>=1."""
  if verbose():
    return
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _Quiet) for f in handler.filters):
    handler.addFilter(_Quiet())
  absl_logging.use_absl_handler()
  for name in ("jax._src.xla_bridge", "jax._src.compiler"):
    logging.getLogger(name).setLevel(logging.ERROR)


def report(error: BaseException) -> None:
  """Prints one `error:` line (and the traceback when verbose)."""
  if verbose():
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
  print(f"error: {_message(error)}", file=sys.stderr)


HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")


def print_help() -> None:
  """The command's docstring (what it does, how to call it) and its own flags."""
  doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
  if doc:
    print(doc + "\n")
  print(flags.FLAGS.main_module_help())
  print("\n  --verbosity: 1 shows library logs and the traceback of an error.")


def _parse(argv: Sequence[str]):
  if any(a in HELP_FLAGS for a in argv[1:]):
    if "--helpfull" in argv:
      print(flags.FLAGS.get_help())
    else:
      print_help()
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_message(e)} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except (KeyError, ValueError, AttributeError) as e:  # config_flags overrides, config files
    print(f"error: {_message(e)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run(main: Callable[[Sequence[str]], Optional[int]]) -> None:
  """`absl.app.run(main)` with this project's logging and error style."""

  def wrapped(argv):
    configure_logging()
    try:
      code = main(argv)
    except user_error_types() as e:
      report(e)
      sys.exit(EXIT_USAGE)
    sys.exit(code or 0)

  app.run(wrapped, flags_parser=_parse)


def no_positional_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {list(argv[1:])}; every option is a --flag "
                     "(see --help)")


def require_flags(*names: str) -> None:
  missing = [f"--{n}" for n in names if flags.FLAGS[n].value in (None, "")]
  if missing:
    raise UsageError(f"{', '.join(missing)} must be given (see --help)")


def config_summary(config, title: str, keys: Sequence[str]) -> str:
  """One line naming the settings that matter for a run."""
  parts = []
  for key in keys:
    value = config
    for part in key.split("."):
      value = value.get(part) if hasattr(value, "get") else None
    if value is not None:
      parts.append(f"{key}={value}")
  return f"{title}: " + "  ".join(parts)
