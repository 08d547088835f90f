"""The one error type for operator mistakes, and how entry points report it.

An ``InputError`` says what input or setting is wrong and where (file, row group, column, row, key).
Every ``python -m recsys.*`` entry point prints its message on one line and exits with status 2, with no
traceback: the traceback of an error raised on purpose only hides the message. Any other exception is a
bug and keeps its traceback. The wrapper that does this is
:func:`recsys.reliability.entry.exit_on_input_error`.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input file, directory or setting the operator got wrong; the message names the culprit."""
