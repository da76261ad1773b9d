"""The checks a parameter value goes through before any work starts: one function per kind of value.

Each returns the value (integers as `int`, numbers as given) or raises, by default `InvalidInput`, with a
message that names the parameter and says what it must be: "top_k must be a positive integer, not 0.".
A caller reading a checkpoint's settings passes `error=CheckpointError` and puts the file in `name`.
`bool` is never a number here, although Python counts True as 1: `top_k=True` is a mistake, not 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import InvalidInput


def positive_int(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False,
                 minimum: int | None = None, error: type[Exception] = InvalidInput) -> int | None:
    """`value` as an int of at least 1 (0 with allow_zero, `minimum` when given); None passes with allow_none.

    numpy integers pass (numbers.Integral); floats, even whole ones, do not.
    """
    if value is None and allow_none:
        return None
    low = minimum if minimum is not None else (0 if allow_zero else 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer of at least {low}")
        raise error(f"{name} must be {kind}{' or None' if allow_none else ''}, not {value!r}.")
    return int(value)


def number(name: str, value: Any, *, allow_none: bool = False, positive: bool = False,
           minimum: float | None = None, maximum: float | None = None, unit: str | None = None,
           error: type[Exception] = InvalidInput) -> float | int | None:
    """`value` as a finite real number, above 0 with positive=True, within [minimum, maximum] when given;
    None passes with allow_none. `unit` ("seconds", "Hz") only words the message."""
    if value is None and allow_none:
        return None
    real = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if (not real or (positive and not value > 0) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        raise error(f"{name} must be {_number_kind(positive, minimum, maximum, unit)}"
                    f"{' or None' if allow_none else ''}, not {value!r}.")
    return value


def probability(name: str, value: Any, *, allow_none: bool = False, error: type[Exception] = InvalidInput
                ) -> float | int | None:
    """`value` as a number between 0 and 1, both included (top_p, a threshold ...)."""
    return number(name, value, allow_none=allow_none, minimum=0.0, maximum=1.0, error=error)


def flag(name: str, value: Any, *, allow_none: bool = True, error: type[Exception] = InvalidInput) -> bool | None:
    """`value` as True or False (None passes unless allow_none=False); 0 and 1 are not flags."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, not {value!r}.")
    return value


def _number_kind(positive: bool, minimum: float | None, maximum: float | None, unit: str | None) -> str:
    """The words for what a number must be: "a positive number of seconds", "a number between 0 and 1"."""
    if minimum is not None and maximum is not None:
        kind = f"a number between {minimum:g} and {maximum:g}"
    elif minimum is not None:
        kind = f"a number of at least {minimum:g}"
    elif maximum is not None:
        kind = f"a number of at most {maximum:g}"
    else:
        kind = "a positive number" if positive else "a number"
    return f"{kind} of {unit}" if unit else kind
