"""What every script shares: library errors become one line on stderr and an exit code.

The library never imports this module; scripts call `run_cli(main)`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

from tfsft.errors import TfsftError


def run_cli(main: Callable[[], Any]) -> NoReturn:
    """Call `main()`; exit 0, or print `error: ...` (one line, no traceback) and exit non-zero."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        main()
    except TfsftError as error:
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(0)
