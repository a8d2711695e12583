"""gapkit's command line: parse, call one library function, render. No logic lives here.

Exit codes: 0 success, 1 error, 2 bad usage or input, 3 not found, 70 internal bug,
130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from typing import Annotated

import click
import typer
from rich.markup import escape

from gapkit import __version__, ui
from gapkit.errors import GapkitError
from gapkit.oci.copy import DEFAULT_JOBS, CopyReport
from gapkit.oci.model import Platform
from gapkit.oci.transports import copy_images, registry_settings_from_flags

app = typer.Typer(
    name="gapkit", no_args_is_help=True, add_completion=False,
    help="Carry a MicroK8s cluster across an air gap.",
    pretty_exceptions_enable=False,
)
_debug = {"on": False}

PlainHttp = Annotated[list[str], typer.Option("--plain-http", metavar="REGISTRY",
                                              help="Use plain HTTP for this registry.")]
Ca = Annotated[list[str], typer.Option("--ca", metavar="REGISTRY=FILE",
                                       help="Trust this CA file for the registry.")]
Creds = Annotated[list[str], typer.Option("--creds", metavar="REGISTRY=USER:PASS",
                                          help="Credentials for the registry.")]
Mirror = Annotated[list[str], typer.Option(
    "--mirror", metavar="UPSTREAM=URL",
    help="Fetch UPSTREAM's images through this mirror first (as containerd's hosts.toml does).")]
Insecure = Annotated[list[str], typer.Option("--insecure", metavar="REGISTRY",
                                             help="HTTPS without certificate verification.")]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")] = False,
) -> None:
    _debug["on"] = debug


@app.command()
def version() -> None:
    """Print gapkit's version."""
    ui.stdout.print(__version__)


@app.command("copy")
def copy_command(
    source: Annotated[str, typer.Argument(metavar="SRC", help="docker://REF, oci:DIR[:REF], "
                                          "oci-archive:FILE[:REF] or docker-archive:FILE[:REF]")],
    destination: Annotated[str, typer.Argument(metavar="DST")],
    platform: Annotated[list[str], typer.Option(
        "--platform", metavar="OS/ARCH[/VARIANT]",
        help="Platform of multi-arch images to copy (repeatable; default: this host's).")] = [],  # noqa: B006
    all_platforms: Annotated[bool, typer.Option("--all-platforms", help="Copy every platform.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=64,
                                      help="Blobs in flight at once.")] = DEFAULT_JOBS,
    plain_http: PlainHttp = [],  # noqa: B006
    ca: Ca = [],  # noqa: B006
    creds: Creds = [],  # noqa: B006
    mirror: Mirror = [],  # noqa: B006
    insecure: Insecure = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Copy images between registries, OCI layouts and archives, checking every digest."""
    settings = registry_settings_from_flags(plain_http, ca, creds, mirror, insecure)
    platforms = [Platform.parse(p) for p in platform]
    with ui.copy_progress(None if not as_json else False) as on_event:
        report = asyncio.run(copy_images(source, destination, settings, platforms, all_platforms,
                                         jobs, on_event))
    _render_copy(report, as_json)


def _render_copy(report: CopyReport, as_json: bool) -> None:
    if as_json:
        ui.stdout.print_json(json.dumps(report.to_json()))
        return
    for image in report.images:
        ui.stdout.print(f"{image.destination}@{image.digest}", highlight=False, soft_wrap=True)
        if image.note:
            ui.stderr.print(f"[yellow]note:[/] {escape(image.note)}", highlight=False, soft_wrap=True)
    ui.stderr.print(
        f"{len(report.images)} image(s): {report.blobs_copied} blob(s) copied "
        f"({ui.human_bytes(report.bytes_copied)}), {report.blobs_present} already there"
        + (f", {report.blobs_mounted} mounted" if report.blobs_mounted else ""),
        highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into messages and exit codes."""
    try:
        app(args=argv, standalone_mode=False)
    except GapkitError as exc:
        ui.error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        ui.error("interrupted; what was complete is kept, run the command again to finish")
        sys.exit(130)
    except Exception as exc:  # any other exception is a bug in gapkit
        if _debug["on"]:
            traceback.print_exc()
        else:
            ui.error(f"internal error: {type(exc).__name__}: {exc}",
                     "this is a bug in gapkit; run again with --debug and report the traceback")
        sys.exit(70)


if __name__ == "__main__":
    main()
