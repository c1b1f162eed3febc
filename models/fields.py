"""Typed reading of one TOML table, with errors that name the file and the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.errors import SpecError


class Fields:
    """Read typed values out of one table of a spec file; every error names file and field."""

    def __init__(self, table: object, path: Path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        if not isinstance(table, dict):
            raise SpecError(path, prefix or "(top level)", "expected a table")
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        """The dotted name of a field, for messages."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> SpecError:
        """An error about one field of this table."""
        return SpecError(self.path, self.where(key), message)

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                raise self.fail(key, "is required")
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def str(self, key: str, default: str | None = None, required: bool = False) -> Any:
        """A string field."""
        return self._get(key, str, default, required)

    def bool(self, key: str, default: bool = False) -> bool:
        """A boolean field."""
        return self._get(key, bool, default, False)

    def int(self, key: str, default: int | None = None, required: bool = False, minimum: int = 0) -> Any:
        """An integer field, at least `minimum`."""
        value = self._get(key, int, default, required)
        if value is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def number(
        self, key: str, default: float | None = None, minimum: float | None = None, required: bool = False,
        maximum: float | None = None,
    ) -> Any:
        """A number field (integer or float), at least `minimum` and at most `maximum` when given."""
        value = self._get(key, (int, float), default, required)
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {value}")
        return None if value is None else float(value)

    def list(self, key: str, required: bool = False) -> list[Any]:
        """A list field (empty when absent and optional)."""
        return self._get(key, list, [], required)

    def table_list(self, key: str, required: bool = False) -> list[Fields]:
        """An array of tables, each as its own `Fields`."""
        return [Fields(t, self.path, f"{self.where(key)}[{i}]") for i, t in enumerate(self.list(key, required))]

    def sub(self, key: str) -> Fields:
        """A nested table (empty when absent)."""
        return Fields(self._get(key, dict, {}, False), self.path, self.where(key))

    def choice(self, key: str, choices: dict[str, Any] | list[str], default: str | None = None) -> Any:
        """A string that must be one of `choices`; answers the mapped value for a dict."""
        value = self.str(key, default, required=default is None)
        if value == default and default not in choices:
            return default  # an optional field's out-of-band default, e.g. "" for none
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(sorted(choices))}, got {value!r}")
        return choices[value] if isinstance(choices, dict) else value

    def each(self, key: str, convert: Callable[[Any], Any], required: bool = False) -> list[Any]:
        """Convert every element of a list field; a ValueError names the element."""
        out = []
        for i, value in enumerate(self.list(key, required)):
            try:
                out.append(convert(value))
            except ValueError as exc:
                raise self.fail(f"{key}[{i}]", str(exc)) from None
        return out

    def done(self) -> None:
        """Reject keys nobody read: a typo must not pass silently."""
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown field")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
