"""The `tfsft` command, and what every command shares: errors become one line on stderr and an
exit code, never a traceback.

`tfsft COMMAND ...` runs one of `tfsft.commands` (`scripts/COMMAND.py` is an alias); `tfsft --help`
lists them. The library never imports this module; commands build their parser with
`ArgumentParser` (flag errors are one line too) and run under `run_cli`.

- A `TfsftError` (bad input, config or artifact) is printed as `error: <message>`, exit 2.
- Any other exception is printed as `error: <stage> failed: <Type>: <message>; full traceback in
  <log file>`, exit 1; `--debug` prints the traceback instead. The stage is the pipeline stage the
  library tagged the exception with (`tfsft.errors.stage`), else the script's name.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from tfsft.errors import ConfigError, TfsftError, stage_of

DEBUG_FLAG = "--debug"
DEBUG_HELP = "Print the full traceback of an unexpected error instead of writing it to a log file."
LOG_DIR_ENV = "TFSFT_LOG_DIR"
UNEXPECTED_EXIT_CODE = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: argument --x: ...`) and a `--debug` flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    return _bounded(text, float, "a number >= 0", lambda v: math.isfinite(v) and v >= 0)


def port_number(text: str) -> int:
    """argparse type: a TCP port (0 lets the OS choose)."""
    return _bounded(text, int, "a port number in [0, 65535]", lambda v: 0 <= v <= 65535)


def _bounded(text: str, kind: type, expected: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}. Received: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}. Received: {text!r}")
    return value


def log_dir() -> Path:
    """Where tracebacks of unexpected errors go: $TFSFT_LOG_DIR, else ~/.cache/tfsft/logs."""
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tfsft" / "logs"


def write_traceback(error: BaseException, name: str) -> Optional[Path]:
    """Write the full traceback of `error` to a new log file; None if no log file could be written."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    header = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join([name, *sys.argv[1:]])}\n\n"
    for directory in (log_dir(), Path("/tmp") / "tfsft-logs"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(header + text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(message: str, error: BaseException, name: str, debug: bool) -> str:
    """`message`, plus where the traceback went (or the traceback itself under --debug)."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        return message
    path = write_traceback(error, name)
    return f"{message}; full traceback in {path}" if path else message


def run_cli(main: Callable[[], Any], name: Optional[str] = None) -> NoReturn:
    """Call `main()`; exit 0, or print `error: ...` (one line, no traceback) and exit non-zero."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = name or Path(sys.argv[0]).stem or "tfsft"
    debug = DEBUG_FLAG in sys.argv[1:]
    try:
        main()
    except TfsftError as error:
        message = one_line(error)
        cause = error.__cause__
        if cause is not None and not isinstance(cause, TfsftError):
            message = _report(message, cause, name, debug)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:
        where = stage_of(error) or name
        message = f"{where} failed: {type(error).__name__}: {one_line(error) or '(no message)'}"
        print(f"error: {_report(message, error, name, debug)}", file=sys.stderr, flush=True)
        sys.exit(UNEXPECTED_EXIT_CODE)
    sys.exit(0)


TRAINING_PACKAGES = ("tensorflow", "tf_keras", "transformers", "tf2onnx", "onnx", "sklearn")
"""Import names the `[train]` extra brings; the base install has none of them."""


def require_training_extras(command: str) -> None:
    """Refuse a training command on the base install with the install line that fixes it."""
    missing = [name for name in TRAINING_PACKAGES if not _installed(name)]
    if missing:
        raise ConfigError(
            f"`tfsft {command}` needs the training extras, which this install lacks (missing: {', '.join(missing)}): "
            "pip install \"tfsft[train]\" (from a checkout: pip install -e \".[train]\")"
        )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def command_summaries() -> dict[str, str]:
    """{command: first line of its docstring}, in pipeline order."""
    from tfsft.commands import COMMANDS

    return {
        name: (importlib.import_module(f"tfsft.commands.{name}").__doc__ or "").strip().splitlines()[0]
        for name in COMMANDS
    }


def usage() -> str:
    import tfsft

    lines = [
        f"usage: tfsft COMMAND [options]   (tfsft {tfsft.__version__})",
        "",
        "Supervised fine-tuning of BERT-family encoders with TensorFlow/Keras, served from ONNX.",
        "",
        "commands:",
        *(f"  {name:<9} {summary}" for name, summary in command_summaries().items()),
        "",
        "`tfsft COMMAND --help` describes a command's options. predict and serve need only the base",
        "install; finetune, evaluate and export need the training extras: pip install \"tfsft[train]\".",
    ]
    return "\n".join(lines)


def run_command(name: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> NoReturn:
    """Parse `argv` (default: sys.argv[1:]) for command `name` and run it under `run_cli`."""
    from tfsft.commands import TRAINING_COMMANDS

    module = importlib.import_module(f"tfsft.commands.{name}")

    def main() -> None:
        args = module.build_parser(prog).parse_args(argv)
        if name in TRAINING_COMMANDS:
            require_training_extras(name)
        module.run(args)

    run_cli(main, name)


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """The `tfsft` console script: `tfsft COMMAND [options]`."""
    from tfsft.commands import COMMANDS

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        import tfsft

        print(f"tfsft {tfsft.__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} (see tfsft --help)",
              file=sys.stderr, flush=True)
        sys.exit(2)
    run_command(argv[0], argv[1:], prog=f"tfsft {argv[0]}")
