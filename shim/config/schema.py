"""Declared config keys and the validation of one TOML section against them.

Every section of ``configuration.toml`` is a list of ``Key``: its name, type,
default and what is allowed. ``validate_section`` fills defaults, rejects
unknown keys (with a "did you mean" where one is close) and reports a bad value
in one line that names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shim.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key: type, default, and the allowed values or range."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def expected(self) -> str:
        """Say in words what values this key takes."""
        if self.choices:
            listed = ", ".join(f'"{c}"' for c in self.choices)
            return f"a list of strings from {listed}" if self.type is list else f"one of {listed}"
        words = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: "a list of strings",
        }[self.type]
        if self.minimum is not None and self.maximum is not None:
            words += f" from {_num(self.minimum)} to {_num(self.maximum)}"
        elif self.minimum is not None:
            words += f" of at least {_num(self.minimum)}"
        return words

    def check(self, value: Any) -> Any:
        """Return the value converted to the key's type, or raise ``ValueError``."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, bool):
            raise ValueError
        if not isinstance(value, self.type):
            raise ValueError
        value = _any(value)  # isinstance against a runtime type narrows to object
        if self.type is list and not all(isinstance(v, str) for v in value):
            raise ValueError
        if self.choices:
            values = value if self.type is list else [value]
            if any(v not in self.choices for v in values):
                raise ValueError
        if self.minimum is not None and value < self.minimum:
            raise ValueError
        if self.maximum is not None and value > self.maximum:
            raise ValueError
        return value


def _any(value: Any) -> Any:
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def format_value(value: Any) -> str:
    """A TOML-ish rendering of a value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def bad_value(source: str, section: str, key: Key, value: Any) -> ConfigError:
    """The one-line error for a value the key does not allow."""
    return ConfigError(
        f"{source}: [{section}] {key.name} = {format_value(value)}: expected {key.expected()}"
    )


def unknown_key(source: str, section: str, name: str, known: Sequence[str]) -> ConfigError:
    """The one-line error for a key the section does not have."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: [{section}] unknown key '{name}'{hint}")


def validate_section(
    source: str, section: str, raw: Mapping[str, Any], keys: Sequence[Key]
) -> dict[str, Any]:
    """Check ``raw`` against ``keys`` and return it with defaults filled in."""
    by_name = {k.name: k for k in keys}
    for name in raw:
        if name not in by_name:
            raise unknown_key(source, section, name, list(by_name))
    values: dict[str, Any] = {}
    for key in keys:  # declared order, so `husk config show` reads like the file
        if key.name in raw:
            try:
                values[key.name] = key.check(raw[key.name])
            except ValueError:
                raise bad_value(source, section, key, raw[key.name]) from None
        else:
            # lists are copied so that no caller can change a key's default
            values[key.name] = list(key.default) if key.type is list else key.default
    return values
