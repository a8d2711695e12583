"""Rendering for the CLI: progress bars, tables, errors. No logic of gapkit lives here.

rich is imported when something is rendered with it, not with this module: `gapkit version`
and `--json` output to a pipe or a file are written without it, since start-up is paid on
every run and scripts run gapkit once per image (see bench/).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from gapkit.units import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

    from gapkit.bundle.create import CreateReport
    from gapkit.bundle.inspect import BundleSummary
    from gapkit.bundle.verify import VerifyReport
    from gapkit.catalog import ImageList, Release
    from gapkit.cluster.check import ClusterCheckReport
    from gapkit.cluster.status import ClusterStatus
    from gapkit.cluster.up import UpReport
    from gapkit.node.check import CheckReport
    from gapkit.node.configure import ConfigureResult
    from gapkit.node.images import ImportReport
    from gapkit.node.listen import ListenReport
    from gapkit.oci.copy import CopyReport, EventHandler
    from gapkit.registry.server import ServeInfo


@functools.cache
def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


@functools.cache
def stdout() -> Console:
    from rich.console import Console

    return Console(soft_wrap=True)


def _plain(file: IO[str]) -> bool:
    """Whether `file` is surely no terminal by rich's test (isatty; when TTY_COMPATIBLE or
    FORCE_COLOR is set, rich decides). There rich writes text without any style, so gapkit
    writes it itself and spares the import."""
    if os.environ.get("TTY_COMPATIBLE") or "FORCE_COLOR" in os.environ:
        return False
    isatty = getattr(file, "isatty", None)
    try:
        return isatty is not None and not isatty()
    except ValueError:
        return False


def print_json(data: object) -> None:
    """`data` as JSON on stdout, as rich's `print_json` writes it (indent 2, non-ASCII kept),
    which colours it on a terminal."""
    if _plain(sys.stdout):
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()  # as rich does: before anything later on stderr
    else:
        stdout().print_json(data=data)


def print_version(version: str) -> None:
    """A version number (no markup, tabs or control characters) on stdout."""
    if _plain(sys.stdout):
        sys.stdout.write(version + "\n")
        sys.stdout.flush()
    else:
        stdout().print(version)


@contextlib.contextmanager
def copy_progress(enabled: bool | None = None) -> Iterator[EventHandler]:
    """A progress bar with bytes/s on a terminal; silent otherwise."""
    if enabled is None:
        enabled = stderr().is_terminal
    if not enabled:
        yield lambda event: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from gapkit.oci.copy import BlobFinished, BlobProgress, BlobStarted, CopyEvent, ImageCopied

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=stderr(), transient=False,
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


def render_copy(report: CopyReport) -> None:
    from rich.markup import escape

    for image in report.images:
        stdout().print(f"{image.destination}@{image.digest}", highlight=False, soft_wrap=True)
        if image.note:
            stderr().print(f"[yellow]note:[/] {escape(image.note)}", highlight=False, soft_wrap=True)
    stderr().print(
        f"{len(report.images)} image(s): {report.blobs_copied} blob(s) copied "
        f"({human_bytes(report.bytes_copied)}), {report.blobs_present} already there"
        + (f", {report.blobs_mounted} mounted" if report.blobs_mounted else ""),
        highlight=False)


def render_image_list(result: ImageList, quiet: bool) -> None:
    """The image list: as a table (or only the references); warnings and notes on stderr."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if quiet:
        for ref in result.references:
            stdout().print(str(ref), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table("IMAGE", "SOURCES", box=box.SIMPLE_HEAD, show_edge=False)
    for entry in result:
        table.add_row(Text(str(entry.reference), overflow="fold"), Text("\n".join(entry.sources)))
    wide_stdout().print(table)
    for note in result.notes:
        stderr().print(f"[bold]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    base = (f"; MicroK8s {result.release.name} needs the {result.release.snap_base} base snap"
            if result.release else "")
    stderr().print(f"{len(result)} image(s) from {', '.join(result.registries) or 'no registry'}{base}",
                   highlight=False, markup=False, soft_wrap=True)


def render_releases(known: tuple[Release, ...]) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table("RELEASE", "BASE", "CONFINEMENT", "CORE IMAGES", "ADDONS", box=box.SIMPLE_HEAD,
                  show_edge=False)
    for r in known:
        name = r.name + (f" ({', '.join(r.aliases)})" if r.aliases else "")
        core = "\n".join(str(i.reference) for i in r.core_images())
        table.add_row(escape(name), r.snap_base, r.confinement, escape(core), ", ".join(r.addons()))
    wide_stdout().print(table)


def wide_stdout() -> Console:
    """Stdout for tables: a terminal wraps them to its width; a pipe or file gets them unfolded."""
    from rich.console import Console

    return stdout() if stdout().is_terminal else Console(file=stdout().file, width=400)


def error(message: str, hint: str | None = None) -> None:
    from rich.markup import escape

    stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        stderr().print(f"[bold]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)


def warning(message: str) -> None:
    from rich.markup import escape

    stderr().print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def render_bundle_created(report: CreateReport) -> None:
    manifest = report.manifest
    stdout().print(f"wrote {report.output}", highlight=False)
    if manifest.microk8s:
        stdout().print(f"  MicroK8s {manifest.microk8s} ({manifest.channel}), base {manifest.snap_base}",
                       highlight=False)
    for snap in manifest.snaps:
        stdout().print(f"  snap {snap.name} revision {snap.revision} ({human_bytes(snap.size)})",
                       highlight=False)
    stdout().print(f"  {len(manifest.images)} image(s), {human_bytes(manifest.blob_bytes)} of blobs "
                   f"({human_bytes(manifest.shared_bytes_saved)} saved by sharing); "
                   f"{report.fetched.blobs_copied} blob(s) fetched, "
                   f"{report.blobs_reused} taken from earlier builds", highlight=False)


def render_verify(report: VerifyReport) -> None:
    from rich.markup import escape

    if report.ok:
        rate = report.blob_bytes / report.seconds / 1e6 if report.seconds else 0.0
        stdout().print(f"{report.path}: OK — {report.images} image(s), {report.blobs} blob(s) "
                       f"({human_bytes(report.blob_bytes)}), {report.snaps} snap(s) checked in "
                       f"{report.seconds:.2f} s ({rate:.0f} MB/s)", highlight=False)
        return
    stderr().print(f"[bold red]{escape(str(report.path))}: {len(report.problems)} problem(s)[/]",
                   highlight=False)
    for problem in report.problems:
        stderr().print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)


def render_bundle_summary(summary: BundleSummary) -> None:
    from rich.markup import escape
    from rich.table import Table

    manifest = summary.manifest
    stdout().print(f"bundle {summary.path} ({human_bytes(summary.file_size)}), made by "
                   f"{manifest.tool} on {manifest.created}", highlight=False)
    if manifest.microk8s:
        stdout().print(f"MicroK8s {manifest.microk8s}, channel {manifest.channel}, "
                       f"base {manifest.snap_base}", highlight=False)
    stdout().print(f"platforms: {', '.join(manifest.platforms)}", highlight=False)
    stdout().print(f"registries: {', '.join(summary.registries) or '-'}", highlight=False)
    if manifest.snaps:
        snaps = Table("snap", "revision", "size", "sha256", box=None)
        for snap in manifest.snaps:
            snaps.add_row(snap.name, snap.revision, human_bytes(snap.size), snap.sha256[:16])
        stdout().print(snaps)
    images = Table("image", "digest", "platforms", "size", box=None)
    for image in manifest.images:
        images.add_row(escape(image.reference), image.digest[:19], ", ".join(image.platforms) or "-",
                       human_bytes(image.size))
    stdout().print(images)
    stdout().print(f"{len(manifest.images)} image(s), {human_bytes(manifest.blob_bytes)} of blobs, "
                   f"{human_bytes(manifest.shared_bytes_saved)} saved by sharing", highlight=False)


def render_hosts_toml(files: dict[str, str]) -> None:
    """The hosts.toml files every node needs, ready to copy."""
    stdout().print(f"\nEach node needs these {len(files)} file(s) "
                   "(MicroK8s: /var/snap/microk8s/current/args/certs.d/<upstream>/hosts.toml; "
                   "no restart needed):", highlight=False)
    for upstream, text in files.items():
        stdout().print(f"\n--- {upstream}/hosts.toml", highlight=False)
        stdout().print(text, markup=False, highlight=False)


@contextlib.contextmanager
def access_log(path: Path | None) -> Iterator[IO[str]]:
    """Where `registry serve` writes its access log: stderr, or a file appended to."""
    if path is None:
        yield stderr().file
        return
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        yield f


def render_serving(info: ServeInfo) -> None:
    """The start-up banner of `registry serve`: what, where, and what nodes need."""
    from rich.markup import escape

    for problem in info.problems:
        warning(problem)
    out = stdout()
    out.print(f"serving {info.images} image(s) in {info.repositories} repositories from "
              f"{escape(str(info.source))} ({info.kind})", highlight=False)
    out.print(f"  upstreams: {', '.join(info.registries)}", highlight=False)
    out.print(f"  listening on {info.listen}: {', '.join(info.urls)}", highlight=False)
    if info.tls is not None and info.tls.ca is not None:
        made = " (new: copy it to every node)" if info.tls.new_ca else ""
        out.print(f"  CA nodes need: {escape(str(info.tls.ca))}{made}", highlight=False)
    if info.auth:
        out.print("  basic auth: on (htpasswd)", highlight=False)
    render_hosts_toml(info.hosts_toml())
    if info.tls is not None and info.tls.ca is not None:
        out.print(f"(copy {escape(str(info.tls.ca))} beside each hosts.toml as ca.crt)",
                  highlight=False)
    out.print("Ctrl-C stops the server; one access log line per request follows.", highlight=False)


def render_configured(result: ConfigureResult) -> None:
    """The plan (diffs, commands, notes), then what was done."""
    stdout().print(result.plan.render(), markup=False, highlight=False, end="")
    applied = result.applied
    if applied is None:
        stderr().print("dry run: nothing was written or run", highlight=False)
    elif not applied.changed:
        stderr().print("nothing changed: the node is already configured so", highlight=False)
    else:
        stderr().print(f"wrote {len(applied.written)} file(s)"
                       + (f", backed up {len(applied.backups)} beside them" if applied.backups else "")
                       + "".join(f"; ran `{' '.join(r.argv)}`" for r in applied.ran),
                       highlight=False, markup=False)


def render_images_imported(report: ImportReport) -> None:
    for image in report.images:
        stdout().print(f"{image.name}@{image.found}", highlight=False, markup=False, soft_wrap=True)
    stderr().print(f"{len(report.images)} image(s) imported into MicroK8s {report.version} on "
                   f"{report.node} ({report.platform}) with `{' '.join(report.command)}` from "
                   f"{report.fed}; each is listed by `microk8s ctr image ls`",
                   highlight=False, markup=False)


_STATUS_STYLE = {"PASS": "bold green", "WARN": "bold yellow", "FAIL": "bold red"}
_PORT_STYLE = {"connected": "green", "free": "green", "refused": "red", "timed out": "red",
               "unreachable": "red", "error": "red", "no answer": "yellow"}


def render_node_check(report: CheckReport, out: Console | None = None) -> None:
    """The checks as a table (status, what was found, the fix), then the node x port matrix."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    out = out or stdout()
    table = Table("CHECK", "STATUS", "DETAIL", "FIX", box=box.SIMPLE_HEAD, show_edge=False,
                  title=f"gapkit node check on {escape(report.node)}", title_justify="left")
    long_fixes = []
    for check in report.checks:
        first, _, more = check.fix.partition("\n")
        if more:
            long_fixes.append(check)
            first += " (the whole fix is below)"
        table.add_row(escape(check.name), Text(check.status, style=_STATUS_STYLE[check.status]),
                      Text(check.detail, overflow="fold"), Text(first, overflow="fold"))
    out.print(table)
    for check in long_fixes:  # snippets to copy: printed whole, never folded into a cell
        out.print(f"\nfix for {escape(check.name)}:", style="bold", highlight=False)
        out.print(check.fix, markup=False, highlight=False, soft_wrap=True)
    matrix = report.matrix
    if matrix is not None and matrix.peers:
        grid = Table("NODE", *(p.label for p in matrix.ports), box=box.SIMPLE_HEAD, show_edge=False,
                     title="ports (this node's own, then each peer as seen from here)",
                     title_justify="left")
        grid.add_row("this node", *(Text(matrix.local[p.label].label,
                                         style=_PORT_STYLE.get(matrix.local[p.label].state, "yellow"))
                                    for p in matrix.ports))
        for peer, probes in matrix.peers.items():
            grid.add_row(escape(peer), *(Text(probes[p.label].state,
                                              style=_PORT_STYLE.get(probes[p.label].state, ""))
                                         for p in matrix.ports))
        out.print(grid)
    counts = report.counts()
    style = "bold red" if counts["FAIL"] else ("bold yellow" if counts["WARN"] else "bold green")
    stderr().print(f"[{style}]{counts['PASS']} passed, {counts['WARN']} warning(s), "
                   f"{counts['FAIL']} failed[/]", highlight=False)


def render_listening(report: ListenReport) -> None:
    """`gapkit node listen`'s start line (on stdout, flushed: scripts wait for it)."""
    until = f"for {report.duration:g} s" if report.duration is not None else "until Ctrl-C"
    stdout().print(f"listening on {report.address}: "
                   f"{', '.join(p.label for p in report.listening)} ({until})",
                   highlight=False, markup=False)
    for label, why in report.skipped.items():
        warning(f"{label} not held: {why}")
    stdout().file.flush()


def render_cluster_check(report: ClusterCheckReport, out: Console | None = None) -> None:
    """One table: checks x nodes; what is not PASS below it; then from-node x peer x port."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    out = out or stdout()
    names = [n.name for n in report.nodes]
    table = Table("CHECK", *map(escape, names), box=box.SIMPLE_HEAD, show_edge=False,
                  title="gapkit cluster check", title_justify="left")
    table.add_row("reachable", *(Text("FAIL", style=_STATUS_STYLE["FAIL"]) if n.report is None
                                 else Text("PASS", style=_STATUS_STYLE["PASS"]) for n in report.nodes))
    for name in report.check_names():
        cells = []
        for node in report.nodes:
            found = [c for c in node.report.checks if c.name == name] if node.report else []
            cells.append(Text(found[0].status, style=_STATUS_STYLE[found[0].status]) if found
                         else Text("-", style="dim"))
        table.add_row(escape(name), *cells)
    out.print(table)
    # What is not PASS, once for every node it applies to (the same fix is not printed thrice).
    seen: dict[tuple[str, str, str, str], list[str]] = {}
    for node in report.nodes:
        if node.report is None:
            out.print(f"[bold red]FAIL[/] {escape(node.name)}: {escape(node.error)}",
                      highlight=False, soft_wrap=True)
            continue
        for check in node.report.checks:
            if check.status != "PASS":
                seen.setdefault((check.status, check.name, check.detail, check.fix), []).append(
                    node.name)
    for (status, name, detail, fix), where in seen.items():
        out.print(f"[{_STATUS_STYLE[status]}]{status}[/] {escape(', '.join(where))}: "
                  f"{escape(name)}: {escape(detail)}", highlight=False, soft_wrap=True)
        if fix:
            out.print("    fix: " + fix.replace("\n", "\n    "), markup=False, highlight=False,
                      soft_wrap=True)
    if report.matrix:
        grid = Table("FROM", "TO", *(p.label for p in report.ports), box=box.SIMPLE_HEAD,
                     show_edge=False, title="ports between nodes (probed from each node)",
                     title_justify="left")
        for src, peers in report.matrix.items():
            for dst, row in peers.items():
                grid.add_row(escape(src), escape(dst), *(
                    Text(row[p.label].state, style=_PORT_STYLE.get(row[p.label].state, "red"))
                    for p in report.ports))
        out.print(grid)
    for note in report.notes:
        stderr().print(f"[bold]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    counts = report.counts()
    style = "bold red" if counts["FAIL"] else ("bold yellow" if counts["WARN"] else "bold green")
    stderr().print(f"[{style}]{counts['PASS']} passed, {counts['WARN']} warning(s), "
                   f"{counts['FAIL']} failed[/]", highlight=False)


def render_cluster_status(report: ClusterStatus, out: Console | None = None) -> None:
    """Node, role, reachable, MicroK8s, images, Ready."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    out = out or stdout()
    table = Table("NODE", "ADDRESS", "ROLE", "REACHABLE", "MICROK8S", "IMAGES", "READY",
                  box=box.SIMPLE_HEAD, show_edge=False, title="gapkit cluster status",
                  title_justify="left")
    for node in report.nodes:
        images = "-" if node.images is None else str(node.images)
        if node.bundle_total is not None:
            images += f" ({node.bundle_present}/{node.bundle_total} of the bundle)"
        ready = Text("?" if node.ready is None else node.ready_detail,
                     style="yellow" if node.ready is None else ("green" if node.ready else "red"))
        table.add_row(escape(node.name), node.address, node.role,
                      Text("yes", style="green") if node.reachable else Text("no", style="red"),
                      node.version or "-", images, ready)
    out.print(table)
    for node in report.nodes:
        if node.error:
            out.print(f"[bold red]{escape(node.name)}[/]: {escape(node.error)}", highlight=False,
                      soft_wrap=True)
        if node.missing:
            out.print(f"{escape(node.name)}: missing {len(node.missing)} image(s): "
                      f"{escape(', '.join(node.missing[:10]))}", highlight=False, soft_wrap=True)
    if report.nodes and all(n.ready is None for n in report.nodes):
        warning(f"Ready unknown: {report.nodes[0].ready_detail}")
    for note in report.notes:
        stderr().print(f"[bold]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def cluster_up_progress(node: str, step: str, detail: str) -> None:
    """One line per step as `cluster up` goes (stderr)."""
    from rich.markup import escape

    stderr().print(f"[bold]{escape(node)}[/]: {escape(step)}" + (f" ({escape(detail)})"
                   if detail else ""), highlight=False, soft_wrap=True)


def render_cluster_up(report: UpReport) -> None:
    """`cluster up`: the plan (every file and command per node), or what each step did."""
    from rich.markup import escape

    if report.planned:
        stdout().print(escape(report.render()), highlight=False, soft_wrap=True, end="")
        return
    for node in report.nodes:
        for step, state in node.steps.items():
            stdout().print(f"{escape(node.node)}: {escape(step)}: {escape(state)}",
                           highlight=False, soft_wrap=True)
    if report.join is not None:
        join = report.join
        if join.joined:
            stdout().print(f"joined: {', '.join(join.joined)}", highlight=False)
        if join.already:
            stdout().print(f"already in the cluster: {', '.join(join.already)}", highlight=False)
        stdout().print(f"[green]Ready[/]: {', '.join(join.ready)}", highlight=False)
