"""Type checks of the options the package's constructors take.

A value that is no number (text read from a setting, ``None`` where it means nothing, a
bool: ``True`` is no second) is a :class:`TypeError` naming the option, instead of Python's
own "'>' not supported between instances of 'str' and 'int'", or of ``True`` taken for 1.
Infinity is a :class:`ValueError` naming the option: no wait, deadline or expiry is made of
it (an option that can mean "never" says so with ``None``). Each constructor then checks
the range its option needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import cast


def real(value: object, name: str, unit: str = "seconds") -> numbers.Real:
    """``value`` as it was given, or :class:`TypeError` naming ``name`` when it is no
    number: for a value kept whatever its size (an int no float holds, inf, nan)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number of {unit}, not {value!r:.64}"
        raise TypeError(msg)
    return value


def number(value: object, name: str, unit: str = "seconds") -> float:
    """``value`` as a float (a Fraction or a numpy scalar too), or :class:`TypeError`
    naming ``name`` when it is no number, :class:`ValueError` when no float holds it or it
    is infinite (NaN is left to the range each option checks)."""
    try:
        seconds = float(real(value, name, unit))
    except OverflowError:  # an int past what a float holds: Python's words name no option
        msg = f"{name} must be a number of {unit} a float holds, not {value!s:.64}"
        raise ValueError(msg) from None
    if math.isinf(seconds):
        msg = f"{name} must be a finite number of {unit}, not {value!s:.64}"
        raise ValueError(msg)
    return seconds


def instant(value: object, name: str) -> None:
    """Refuse ``value`` as an expiry in seconds since the epoch, or ``None`` (never): a
    :class:`TypeError` naming ``name`` when no clock reading could be compared with it (no
    number, a bool, NaN), a :class:`ValueError` when it is infinite (``None`` says never;
    minus infinity is a mistake, not a past moment). An int no float holds is taken: a
    token's ``exp`` copied as it came may be one, and it never comes."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and math.isnan(value))
    ):
        msg = f"{name} must be seconds since the epoch or None, not {value!r:.64}"
        raise TypeError(msg)
    if isinstance(value, float) and math.isinf(value):
        msg = f"{name} must be finite seconds since the epoch, or None for never, not {value}"
        raise ValueError(msg)


def whole(value: object, name: str, unit: str) -> int:
    """``value`` as an int, or :class:`TypeError` naming ``name`` when it is no whole
    number (``2.0`` is not taken either: a count given as a float is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be a whole number of {unit}, not {value!r:.64}"
        raise TypeError(msg)
    return int(value)


def clock(value: object) -> Callable[[], float]:
    """``value``, or :class:`TypeError` when it cannot be called: a clock is first read in
    a request, which would fail there instead of at start-up."""
    if not callable(value):
        msg = f"clock must be a callable returning seconds, not {type(value).__name__}"
        raise TypeError(msg)
    return cast("Callable[[], float]", value)
