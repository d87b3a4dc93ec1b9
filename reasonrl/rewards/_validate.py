"""Field validators for the frozen reward config dataclasses: each raises ``ValueError`` naming the field."""

from __future__ import annotations

import math

__all__ = ["check_real", "check_int", "check_choice", "check_str", "check_bool"]


def check_real(cls: str, name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False,
               allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{cls}.{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{cls}.{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{cls}.{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def check_int(cls: str, name: str, value, *, lo=None, hi=None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{cls}.{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{cls}.{name} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{cls}.{name} must be <= {hi}, got {value!r}")


def check_choice(cls: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {tuple(choices)}, got {value!r}")


def check_str(cls: str, name: str, value, *, allow_empty=True, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f"{cls}.{name} must be a{'' if allow_empty else ' non-empty'} string, got {value!r}")


def check_bool(cls: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{cls}.{name} must be a bool, got {value!r}")
