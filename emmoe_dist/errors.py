"""Errors the user can act on: each names where the bad input is (file, line, field)."""

from __future__ import annotations

from dataclasses import dataclass


class EmmoeError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


class InputError(EmmoeError):
    """Bad input at a known place: `file:line: field: message`."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")


@dataclass(frozen=True)
class Where:
    """A place in the user's input (experiment file and line, a flag, a sweep arm), for errors
    found after the input was parsed: they name the place the user wrote, not an internal one."""

    file: str | None = None
    line: int | None = None
    field: str | None = None

    def error(self, message: str, *, suffix: str = "") -> InputError:
        """An InputError here; `suffix` extends the field (`selection.experts` + `.0`)."""
        field = f"{self.field}{suffix}" if self.field else suffix.lstrip(".") or None
        return InputError(message, file=self.file, line=self.line, field=field)
