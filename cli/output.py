"""Terminal output helpers shared by the commands."""

import json
import sys

import click


def fail(message: str, exit_code: int = 1) -> None:
    """Print one `Error: ...` line to stderr and exit."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(exit_code)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def progress_text(record: dict) -> str:
    progress = record.get("progress") or {}
    done, total = progress.get("done"), progress.get("total")
    if total:
        return f"{done}/{total}"
    return ""


def print_records(records: list[dict]) -> None:
    """Print status records as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("job", "state", "attempt", "progress", "created", "message"):
        table.add_column(column, overflow="fold", no_wrap=column == "job", min_width=len(column))
    for record in records:
        table.add_row(
            record["job_id"],
            record["state"],
            str(record.get("attempt", "")),
            progress_text(record),
            (record.get("created_at") or "")[:19],
            (record.get("message") or "")[:200],
        )
    Console().print(table)
