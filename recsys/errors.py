"""The one error type for operator mistakes, and how entry points report it.

An ``InputError`` says what input or setting is wrong and where (file, row group, column, row, key).
Every ``python -m recsys.*`` entry point prints its message on one line and exits with status 2, with no
traceback: the traceback of an error raised on purpose only hides the message. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INPUT_ERROR_EXIT = 2


class InputError(ValueError):
    """An input file, directory or setting the operator got wrong; the message names the culprit."""


def exit_on_input_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps an entry point (under ``@hydra.main``): an ``InputError`` becomes ``error: <message>`` on
    stderr and exit status 2. ``SystemExit`` passes through Hydra's own handler, which only catches
    ``Exception``. The composed config is first checked for undeclared keys
    (``recsys.reliability.strict_config``), so every entry point refuses them the same way."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            if args:  # the composed Hydra config: a key added with +key=value would be silently dropped
                from recsys.reliability.strict_config import check_known_keys

                check_known_keys(args[0])
            return main(*args, **kwargs)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT) from None

    return wrapped
