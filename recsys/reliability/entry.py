"""How every ``python -m recsys.*`` entry point reports an operator mistake (see ``recsys.errors``)."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from recsys.errors import InputError
from recsys.reliability.strict_config import check_known_keys

T = TypeVar("T")

INPUT_ERROR_EXIT = 2


def exit_on_input_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps an entry point (under ``@hydra.main``): an ``InputError`` becomes ``error: <message>`` on
    stderr and exit status 2. ``SystemExit`` passes through Hydra's own handler, which only catches
    ``Exception``. The composed config is first checked for undeclared keys
    (:func:`~recsys.reliability.strict_config.check_known_keys`), so every entry point refuses them the
    same way."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            if args:  # the composed Hydra config: a key added with +key=value would be silently dropped
                check_known_keys(args[0])
            return main(*args, **kwargs)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT) from None

    return wrapped
