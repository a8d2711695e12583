"""Rendering for the CLI: progress bars, tables, errors. No logic of gapkit lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich import box
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
from rich.table import Table
from rich.text import Text

from gapkit.oci.copy import BlobFinished, BlobProgress, BlobStarted, CopyEvent, EventHandler, ImageCopied
from gapkit.units import human_bytes

if TYPE_CHECKING:
    from gapkit.bundle.create import CreateReport
    from gapkit.bundle.inspect import BundleSummary
    from gapkit.bundle.verify import VerifyReport
    from gapkit.cluster.check import ClusterCheckReport
    from gapkit.cluster.status import ClusterStatus
    from gapkit.cluster.up import UpReport
    from gapkit.node.check import CheckReport
    from gapkit.node.configure import ConfigureResult
    from gapkit.node.images import ImportReport
    from gapkit.node.listen import ListenReport
    from gapkit.registry.server import ServeInfo

stderr = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)


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


def warning(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def render_bundle_created(report: CreateReport) -> None:
    manifest = report.manifest
    stdout.print(f"wrote {report.output}", highlight=False)
    if manifest.microk8s:
        stdout.print(f"  MicroK8s {manifest.microk8s} ({manifest.channel}), base {manifest.snap_base}",
                     highlight=False)
    for snap in manifest.snaps:
        stdout.print(f"  snap {snap.name} revision {snap.revision} ({human_bytes(snap.size)})",
                     highlight=False)
    stdout.print(f"  {len(manifest.images)} image(s), {human_bytes(manifest.blob_bytes)} of blobs "
                 f"({human_bytes(manifest.shared_bytes_saved)} saved by sharing); "
                 f"{report.fetched.blobs_copied} blob(s) fetched, "
                 f"{report.fetched.blobs_present} already in the cache", highlight=False)


def render_verify(report: VerifyReport) -> None:
    if report.ok:
        rate = report.blob_bytes / report.seconds / 1e6 if report.seconds else 0.0
        stdout.print(f"{report.path}: OK — {report.images} image(s), {report.blobs} blob(s) "
                     f"({human_bytes(report.blob_bytes)}), {report.snaps} snap(s) checked in "
                     f"{report.seconds:.2f} s ({rate:.0f} MB/s)", highlight=False)
        return
    stderr.print(f"[bold red]{escape(str(report.path))}: {len(report.problems)} problem(s)[/]",
                 highlight=False)
    for problem in report.problems:
        stderr.print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)


def render_bundle_summary(summary: BundleSummary) -> None:
    manifest = summary.manifest
    stdout.print(f"bundle {summary.path} ({human_bytes(summary.file_size)}), made by "
                 f"{manifest.tool} on {manifest.created}", highlight=False)
    if manifest.microk8s:
        stdout.print(f"MicroK8s {manifest.microk8s}, channel {manifest.channel}, "
                     f"base {manifest.snap_base}", highlight=False)
    stdout.print(f"platforms: {', '.join(manifest.platforms)}", highlight=False)
    stdout.print(f"registries: {', '.join(summary.registries) or '-'}", highlight=False)
    if manifest.snaps:
        snaps = Table("snap", "revision", "size", "sha256", box=None)
        for snap in manifest.snaps:
            snaps.add_row(snap.name, snap.revision, human_bytes(snap.size), snap.sha256[:16])
        stdout.print(snaps)
    images = Table("image", "digest", "platforms", "size", box=None)
    for image in manifest.images:
        images.add_row(escape(image.reference), image.digest[:19], ", ".join(image.platforms) or "-",
                       human_bytes(image.size))
    stdout.print(images)
    stdout.print(f"{len(manifest.images)} image(s), {human_bytes(manifest.blob_bytes)} of blobs, "
                 f"{human_bytes(manifest.shared_bytes_saved)} saved by sharing", highlight=False)


def render_hosts_toml(files: dict[str, str]) -> None:
    """The hosts.toml files every node needs, ready to copy."""
    stdout.print(f"\nEach node needs these {len(files)} file(s) "
                 "(MicroK8s: /var/snap/microk8s/current/args/certs.d/<upstream>/hosts.toml; "
                 "no restart needed):", highlight=False)
    for upstream, text in files.items():
        stdout.print(f"\n--- {upstream}/hosts.toml", highlight=False)
        stdout.print(text, markup=False, highlight=False)


@contextlib.contextmanager
def access_log(path: Path | None) -> Iterator[IO[str]]:
    """Where `registry serve` writes its access log: stderr, or a file appended to."""
    if path is None:
        yield stderr.file
        return
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        yield f


def render_serving(info: ServeInfo) -> None:
    """The start-up banner of `registry serve`: what, where, and what nodes need."""
    for problem in info.problems:
        warning(problem)
    out = stdout
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
    stdout.print(result.plan.render(), markup=False, highlight=False, end="")
    applied = result.applied
    if applied is None:
        stderr.print("dry run: nothing was written or run", highlight=False)
    elif not applied.changed:
        stderr.print("nothing changed: the node is already configured so", highlight=False)
    else:
        stderr.print(f"wrote {len(applied.written)} file(s)"
                     + (f", backed up {len(applied.backups)} beside them" if applied.backups else "")
                     + "".join(f"; ran `{' '.join(r.argv)}`" for r in applied.ran),
                     highlight=False, markup=False)


def render_images_imported(report: ImportReport) -> None:
    for image in report.images:
        stdout.print(f"{image.name}@{image.found}", highlight=False, markup=False, soft_wrap=True)
    stderr.print(f"{len(report.images)} image(s) imported into MicroK8s {report.version} on "
                 f"{report.node} ({report.platform}) with `{' '.join(report.command)}` from "
                 f"{report.fed}; each is listed by `microk8s ctr image ls`",
                 highlight=False, markup=False)


_STATUS_STYLE = {"PASS": "bold green", "WARN": "bold yellow", "FAIL": "bold red"}
_PORT_STYLE = {"connected": "green", "free": "green", "refused": "red", "timed out": "red",
               "unreachable": "red", "error": "red", "no answer": "yellow"}


def render_node_check(report: CheckReport, out: Console | None = None) -> None:
    """The checks as a table (status, what was found, the fix), then the node x port matrix."""
    out = out or stdout
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
    stderr.print(f"[{style}]{counts['PASS']} passed, {counts['WARN']} warning(s), "
                 f"{counts['FAIL']} failed[/]", highlight=False)


def render_listening(report: ListenReport) -> None:
    """`gapkit node listen`'s start line (on stdout, flushed: scripts wait for it)."""
    until = f"for {report.duration:g} s" if report.duration is not None else "until Ctrl-C"
    stdout.print(f"listening on {report.address}: "
                 f"{', '.join(p.label for p in report.listening)} ({until})",
                 highlight=False, markup=False)
    for label, why in report.skipped.items():
        warning(f"{label} not held: {why}")
    stdout.file.flush()


def render_cluster_check(report: ClusterCheckReport, out: Console | None = None) -> None:
    """One table: checks x nodes; what is not PASS below it; then from-node x peer x port."""
    out = out or stdout
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
        stderr.print(f"[bold]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    counts = report.counts()
    style = "bold red" if counts["FAIL"] else ("bold yellow" if counts["WARN"] else "bold green")
    stderr.print(f"[{style}]{counts['PASS']} passed, {counts['WARN']} warning(s), "
                 f"{counts['FAIL']} failed[/]", highlight=False)


def render_cluster_status(report: ClusterStatus, out: Console | None = None) -> None:
    """Node, role, reachable, MicroK8s, images, Ready."""
    out = out or stdout
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
        stderr.print(f"[bold]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def cluster_up_progress(node: str, step: str, detail: str) -> None:
    """One line per step as `cluster up` goes (stderr)."""
    stderr.print(f"[bold]{escape(node)}[/]: {escape(step)}" + (f" ({escape(detail)})"
                 if detail else ""), highlight=False, soft_wrap=True)


def render_cluster_up(report: UpReport) -> None:
    """`cluster up`: the plan (every file and command per node), or what each step did."""
    if report.planned:
        stdout.print(escape(report.render()), highlight=False, soft_wrap=True, end="")
        return
    for node in report.nodes:
        for step, state in node.steps.items():
            stdout.print(f"{escape(node.node)}: {escape(step)}: {escape(state)}",
                         highlight=False, soft_wrap=True)
    if report.join is not None:
        join = report.join
        if join.joined:
            stdout.print(f"joined: {', '.join(join.joined)}", highlight=False)
        if join.already:
            stdout.print(f"already in the cluster: {', '.join(join.already)}", highlight=False)
        stdout.print(f"[green]Ready[/]: {', '.join(join.ready)}", highlight=False)
