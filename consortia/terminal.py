"""The command line's terminal: one console on stderr, and what the rooms say printed as is.

rich reads [brackets] in a string as markup and drops what it takes for a tag: an error
naming `pip install 'consortia[parquet]'`, or a SuperNode's "[code: 2004] Failed to
activate SuperNode.", would lose exactly the part that says what to do. So messages and
reports from the rooms go out with markup off; only our own "error:" label is styled.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def say(text: str) -> None:
    """Print a room's report (a log line of `server start`, `client join`) as it is, on
    one line however long (a path in it stays whole for whoever greps the log)."""
    console.print(text, markup=False, soft_wrap=True)


def fail(err: Exception | str, code: int = 2) -> typer.Exit:
    """Print the error as it is, after a red "error:"; returns the Exit to raise."""
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code)
