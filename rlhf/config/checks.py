"""The error type of every config check and the two checks most fields use."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check_choice(name: str, value: object, allowed) -> None:
    """Mode strings are checked when the config is composed, with the allowed values in the message."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(allowed, key=str)}")


def check_range(
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """`value` within [low, high] (or (low, high] with `low_open`); None passes (an optional field)."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = (
            f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        )
        raise ConfigError(f"{name}={value} is out of range: it must be in {bounds}")
