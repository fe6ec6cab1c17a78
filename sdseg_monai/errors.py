"""User-facing errors: one line, naming the file and the problem."""

from __future__ import annotations

import math
import numbers
import os


class SDSegInputError(Exception):
    """Bad input from the user (a file, a path, a setting). The CLI prints it on one line and exits 2."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        text = " ".join(str(message).split())
        super().__init__(f"{self.path}: {text}" if self.path else text)


class WeightsError(SDSegInputError):
    """Weights that are missing, unreadable or do not fit the model they are loaded into."""


def check_number(value, name: str = "", low: float | None = None, high: float | None = None, *, positive: bool = False) -> float:
    """``value`` as a float, refused unless finite and in range: NaN passes every ``<`` check, and
    an infinite rate, decay or time limit runs without meaning.

    Args:
        value: the setting.
        name: what it is, starting the message (e.g. ``"--base-lr"``); empty: the message starts at "must".
        low, high: inclusive bounds (None: none).
        positive: ``low`` is exclusive (0 when not given): a value must lie above it.

    Raises:
        SDSegInputError: not a finite number, or out of range.
    """
    try:  # a number, not text that reads as one: "0.1" * 8 would be text repeated, not a rate
        number = float(value) if isinstance(value, numbers.Real) else math.nan
    except (TypeError, ValueError, OverflowError):  # an int beyond float's range
        number = math.nan
    if positive:  # an exclusive lower bound
        low = 0.0 if low is None else low
    wanted = " and ".join(part for part in (
        "" if low is None else f"{'>' if positive else '>='} {low:g}", "" if high is None else f"<= {high:g}") if part)
    if (isinstance(value, bool) or not math.isfinite(number) or (low is not None and (number <= low if positive else number < low))
            or (high is not None and number > high)):
        message = f"must be a finite number{' ' + wanted if wanted else ''}, got {value!r}"
        raise SDSegInputError(f"{name} {message}" if name else message)
    return number
