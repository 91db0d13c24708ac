"""What an admin command answers: a table, or an AdminError with the SQLSTATE the admin database reports it with;
and the aligned text `shardproxy admin` prints."""

from __future__ import annotations

from dataclasses import dataclass, field

Value = str | int | float | bool | None

SYNTAX_ERROR = "42601"
NOT_POSSIBLE_NOW = "55000"  # object_not_in_prerequisite_state


class AdminError(Exception):
    """A command failed: the reply's error, and the SQLSTATE the admin database reports it with."""

    def __init__(self, message: str, code: str = NOT_POSSIBLE_NOW):
        super().__init__(message)
        self.code = code


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Value]] = field(default_factory=list)


def format_table(columns: list[str], rows: list[list[Value]]) -> str:
    cells = [columns, *[["" if value is None else text(value) for value in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
