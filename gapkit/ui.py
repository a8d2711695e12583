"""Rendering for the CLI: progress bars, tables, errors. No logic of gapkit lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gapkit.oci.copy import BlobFinished, BlobProgress, BlobStarted, CopyEvent, EventHandler, ImageCopied

stderr = Console(stderr=True)
stdout = Console()


@contextlib.contextmanager
def copy_progress(enabled: bool | None = None) -> Iterator[EventHandler]:
    """A progress bar with bytes/s on a terminal; silent otherwise."""
    if enabled is None:
        enabled = stderr.is_terminal
    if not enabled:
        yield lambda event: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=stderr, transient=False,
    ) as progress:
        task: TaskID = progress.add_task("copying", total=0)
        state = {"images": 0}

        def on_event(event: CopyEvent) -> None:
            if isinstance(event, BlobStarted):
                total = progress.tasks[0].total or 0
                progress.update(task, total=total + event.size)
            elif isinstance(event, BlobProgress):
                progress.advance(task, event.nbytes)
            elif isinstance(event, BlobFinished) and event.how != "copied":
                total = progress.tasks[0].total or 0
                progress.update(task, total=total + event.size, advance=event.size)
            elif isinstance(event, ImageCopied):
                state["images"] += 1
                progress.update(task, description=f"copied {state['images']} image(s)")
                progress.console.print(f"  {event.destination}  {event.digest}", markup=False)

        yield on_event


def error(message: str, hint: str | None = None) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        stderr.print(f"[bold]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
