"""The library's known errors, and how the entry points report them.

`InputError` is what the library raises for a problem with what it was given (bad sizes or
config values, frames beyond the positional encoding, unreadable or wrong files, missing keys).
It subclasses ValueError, so callers that catch ValueError keep working. The entry points turn
it into one `error: ...` line and exit status 2, as argparse does; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class InputError(ValueError):
  """A problem with the input (arguments, configs, files), not with the code."""


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv=None) -> int:
  """main(argv) -> exit status; known errors become `error: ...` on stderr and status 2."""
  try:
    return main(argv)
  except (InputError, OSError) as e:
    # OSError: a missing or unreadable file the user named.
    msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    return 2
