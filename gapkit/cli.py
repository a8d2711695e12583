"""gapkit's command line: parse, call one library function, render. No logic lives here.

Exit codes: 0 success, 1 error, 2 bad usage or input, 3 not found, 70 internal bug,
130 interrupted.
"""

import errno
import gc
import sys
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from gapkit import __version__, ui
from gapkit.errors import GapkitError, UsageError
from gapkit.oci.stores.options import DEFAULT_JOBS, DEFAULT_RETRIES, DEFAULT_TIMEOUT

# Start-up is paid on every run, and scripts run gapkit once per image (see bench/). So:
# - every layer below (and asyncio, rich, pydantic, aiohttp) is imported inside the commands
#   that use it, and `gapkit version` and `--help` import none of them;
# - annotations are not postponed (no `from __future__ import annotations`): typer reads
#   them at every start, and evaluating the strings again cost more than the rest of its work.

if TYPE_CHECKING:
    from gapkit.oci.copy import CopyReport

T = TypeVar("T")


def _run(work: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(work)


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
Retries = Annotated[int, typer.Option(
    "--retries", min=0, max=100, metavar="N",
    help="Retries of a failing request (reset, stall, 429, 5xx) before giving up.")]
Timeout = Annotated[float, typer.Option(
    "--timeout", min=0.1, metavar="S",
    help="Seconds to connect, and the longest silence tolerated while reading.")]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")] = False,
) -> None:
    _debug["on"] = debug


@app.command()
def version() -> None:
    """Print gapkit's version."""
    ui.print_version(__version__)


@app.command("copy")
def copy_command(
    locations: Annotated[list[str], typer.Argument(
        metavar="SRC... DST", help="Sources, then the destination: docker://REF, oci:DIR[:REF], "
        "oci-archive:FILE[:REF] or docker-archive:FILE[:REF]")],
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
    retries: Retries = DEFAULT_RETRIES,
    timeout: Timeout = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Copy images between registries, OCI layouts and archives, checking every digest.

    Several sources copy into one layout or archive, each image keeping its name.
    """
    from gapkit.oci.model import Platform
    from gapkit.oci.transports import copy_images, registry_settings_from_flags

    if len(locations) < 2:
        raise UsageError("gapkit copy needs a source and a destination: gapkit copy SRC... DST")
    *source, destination = locations
    settings = registry_settings_from_flags(plain_http, ca, creds, mirror, insecure,
                                            retries=retries, timeout=timeout)
    platforms = [Platform.parse(p) for p in platform]
    with ui.copy_progress(None if not as_json else False) as on_event:
        report = _run(copy_images(source, destination, settings, platforms, all_platforms,
                                  jobs, on_event))
    _render_copy(report, as_json)


def _render_copy(report: "CopyReport", as_json: bool) -> None:
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_copy(report)


images_app = typer.Typer(name="images", no_args_is_help=True,
                         help="Work out which images a MicroK8s cluster and its workloads need.")
app.add_typer(images_app, name="images")


@images_app.command("list")
def images_list_command(
    microk8s: Annotated[str | None, typer.Option(
        "--microk8s", metavar="RELEASE",
        help="MicroK8s release or channel (1.32, 1.32-strict/stable, latest): its core images.")] = None,
    addons: Annotated[list[str], typer.Option(
        "--addons", metavar="ADDON,...", help="Addons to enable (comma-separated, repeatable).")] = [],  # noqa: B006
    manifests: Annotated[list[Path], typer.Option(
        "--manifests", metavar="PATH",
        help="Kubernetes YAML/JSON file, folder (walked) or Helm chart (repeatable).")] = [],  # noqa: B006
    image: Annotated[list[str], typer.Option(
        "--image", metavar="REF", help="An image to add (repeatable).")] = [],  # noqa: B006
    images_from: Annotated[list[Path], typer.Option(
        "--images-from", metavar="FILE", help="A file of images, one a line, # comments.")] = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the references.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List every image the cluster needs, normalised and de-duplicated, with where each came from."""
    from gapkit.catalog import resolve_images

    result = resolve_images(microk8s, addons, manifests, image, images_from)
    for warning in result.warnings:
        ui.warning(warning)
    if as_json:
        ui.print_json(result.to_json())
    else:
        ui.render_image_list(result, quiet)


@images_app.command("releases")
def images_releases_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the releases as JSON.")] = False,
) -> None:
    """List the MicroK8s releases the catalog knows, with their base snap and core images."""
    from gapkit.catalog import releases

    known = releases()
    if as_json:
        ui.print_json([r.to_json() for r in known])
    else:
        ui.render_releases(known)


bundle_app = typer.Typer(name="bundle", no_args_is_help=True,
                         help="Build, check and look into bundles: one file for the whole gap.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("create")
def bundle_create_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write.")],
    spec_file: Annotated[Path | None, typer.Option("--file", "-f", help="A gapkit.yaml spec.")] = None,
    microk8s: Annotated[str | None, typer.Option(help="MicroK8s release, e.g. 1.32.")] = None,
    channel: Annotated[str | None, typer.Option(help="Snap channel (default RELEASE/stable).")] = None,
    addons: Annotated[str | None, typer.Option(help="Comma-separated addons, e.g. dns,ingress.")] = None,
    image: Annotated[list[str], typer.Option("--image", metavar="REF")] = [],  # noqa: B006
    images_from: Annotated[list[Path], typer.Option("--images-from", metavar="FILE")] = [],  # noqa: B006
    manifests: Annotated[list[Path], typer.Option("--manifests", metavar="DIR")] = [],  # noqa: B006
    platform: Annotated[list[str], typer.Option("--platform", metavar="OS/ARCH")] = [],  # noqa: B006
    no_snaps: Annotated[bool, typer.Option("--no-snaps", help="Images only.")] = False,
    snaps_from: Annotated[Path | None, typer.Option(help="Take snaps from this folder.")] = None,
    no_snapd: Annotated[bool, typer.Option("--no-snapd", help="Leave the snapd snap out.")] = False,
    plain_http: PlainHttp = [],  # noqa: B006
    ca: Ca = [],  # noqa: B006
    creds: Creds = [],  # noqa: B006
    mirror: Mirror = [],  # noqa: B006
    insecure: Insecure = [],  # noqa: B006
    retries: Annotated[int | None, typer.Option(
        "--retries", min=0, max=100, metavar="N",
        help=f"Retries of a failing request (default {DEFAULT_RETRIES}).")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0.1, metavar="S",
        help=f"Connect and read-silence timeout (default {DEFAULT_TIMEOUT:.0f} s).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder (default ~/.cache/gapkit).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=64)] = DEFAULT_JOBS,
    as_json: Annotated[bool, typer.Option("--json", help="Print bundle.json and fetch counts.")] = False,
) -> None:
    """Build one bundle: MicroK8s snaps and every image the cluster and its workloads need."""
    from gapkit.bundle.create import create_bundle
    from gapkit.bundle.spec import bundle_flags, load_spec

    overrides = bundle_flags(
        microk8s=microk8s, channel=channel, addons=addons, images=image, images_from=images_from,
        manifests=manifests, platforms=platform, no_snaps=no_snaps, snaps_from=snaps_from,
        no_snapd=no_snapd, plain_http=plain_http, ca=ca, creds=creds, mirrors=mirror,
        insecure=insecure, retries=retries, timeout=timeout)
    spec = load_spec(spec_file, overrides)
    with ui.copy_progress(None if not as_json else False) as on_event:
        report = _run(create_bundle(spec, output, cache, jobs, on_event, ui.warning))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_bundle_created(report)


@bundle_app.command("verify")
def bundle_verify_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle to check.")],
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Hashing threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every blob, image, snap and bundle.json; list every problem (exit 1 if any)."""
    from gapkit.bundle.verify import verify_bundle

    report = _run(verify_bundle(bundle, jobs))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_verify(report)
    if not report.ok:
        raise typer.Exit(1)


@bundle_app.command("inspect")
def bundle_inspect_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle to look into.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the MicroK8s release, snaps, images, registries and sizes of a bundle."""
    from gapkit.bundle.inspect import inspect_bundle

    summary = _run(inspect_bundle(bundle))
    if as_json:
        ui.print_json(summary.to_json())
    else:
        ui.render_bundle_summary(summary)


@images_app.command("export")
def images_export_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle to take images from.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The tar to write.")],
    platform: Annotated[list[str], typer.Option("--platform", metavar="OS/ARCH")] = [],  # noqa: B006
    archive_format: Annotated[str, typer.Option(
        "--format", help="oci (microk8s/ctr import, Docker 25+) or docker (docker load).")] = "oci",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write an images-only tar that `microk8s images import` and `ctr image import` take."""
    from gapkit.bundle.export import archive_format_of, export_images
    from gapkit.oci.model import Platform

    platforms = [Platform.parse(p) for p in platform]
    with ui.copy_progress(None if not as_json else False) as on_event:
        report = _run(export_images(bundle, output, platforms or None,
                                    archive_format_of(archive_format), on_event=on_event))
    _render_copy(report, as_json)


registry_app = typer.Typer(name="registry", no_args_is_help=True,
                           help="Serve a bundle as a registry mirror, or push it into the site's own.")
app.add_typer(registry_app, name="registry")


@registry_app.command("push")
def registry_push_command(
    source: Annotated[Path, typer.Argument(help="A bundle, an OCI layout folder or an image tar.")],
    to: Annotated[str, typer.Option("--to", metavar="HOST[:PORT][/PREFIX]",
                                    help="The registry (and path prefix) to push to.")],
    plain_http: Annotated[bool, typer.Option("--plain-http", help="The registry speaks HTTP.")] = False,
    ca: Annotated[Path | None, typer.Option("--ca", help="CA file of the registry's certificate.")] = None,
    creds: Annotated[str | None, typer.Option("--creds", metavar="USER:PASS")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="HTTPS without verification.")] = False,
    upstream_prefix: Annotated[bool, typer.Option(
        "--upstream-prefix", help="Push to HOST/docker.io/calico/cni instead of HOST/calico/cni.")] = False,
    platform: Annotated[list[str], typer.Option("--platform", metavar="OS/ARCH")] = [],  # noqa: B006
    hosts_dir: Annotated[Path | None, typer.Option(
        "--hosts-dir", help="Also write <upstream>/hosts.toml (and ca.crt) under this folder.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=64)] = DEFAULT_JOBS,
    retries: Retries = DEFAULT_RETRIES,
    timeout: Timeout = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Push every image into a registry and print the hosts.toml each node needs."""
    from gapkit.oci.model import Platform
    from gapkit.registry.push import host_options, push_source

    options = host_options(plain_http, ca, creds, insecure)
    platforms = [Platform.parse(p) for p in platform] or None
    with ui.copy_progress(None if not as_json else False) as on_event:
        report = _run(push_source(source, to, options, upstream_prefix, platforms, jobs,
                                  on_event, hosts_dir, retries, timeout))
    if as_json:
        ui.print_json(report.to_json())
        return
    ui.render_copy(report.copied)
    ui.render_hosts_toml(report.hosts_toml)


@registry_app.command("serve")
def registry_serve_command(
    source: Annotated[Path, typer.Argument(
        help="A bundle, an image tar (ctr/microk8s export, docker save, skopeo) or an OCI layout.")],
    listen: Annotated[str, typer.Option("--listen", metavar="ADDR:PORT")] = "0.0.0.0:5000",
    tls: Annotated[str, typer.Option(
        "--tls", metavar="auto|off", help="auto: a CA and certificate kept in --state.")] = "auto",
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="The site's own certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its key.")] = None,
    htpasswd: Annotated[Path | None, typer.Option(
        "--htpasswd", help="Basic auth users (bcrypt, `htpasswd -B`).")] = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="Where --tls auto keeps its CA (default ~/.local/state/gapkit/registry).")] = None,
    name: Annotated[list[str], typer.Option(
        "--name", metavar="HOST", help="Another name or address for the certificate.")] = [],  # noqa: B006
    access_log: Annotated[Path | None, typer.Option(
        "--access-log", help="Append the access log here instead of stderr.")] = None,
) -> None:
    """Serve images read-only as a registry mirror for every upstream they come from."""
    from gapkit.registry.server import serve, tls_mode

    with ui.access_log(access_log) as log:
        _run(serve(source, listen, tls_mode(tls), tls_cert, tls_key, htpasswd, state,
                   tuple(name), log, ui.render_serving))


@images_app.command("import")
def images_import_command(
    source: Annotated[Path, typer.Argument(help="A bundle or an image tar (OCI or docker save).")],
    tmp_dir: Annotated[Path | None, typer.Option(
        "--tmp-dir", help="Where a bundle's lean images tar is written first (MicroK8s >= 1.25).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Side-load images into MicroK8s on this node, then check every one is there by digest."""
    from gapkit.node.images import import_images
    from gapkit.node.plan import LocalRunner

    with ui.copy_progress(None if not as_json else False) as on_event:
        report = _run(import_images(LocalRunner(), source, tmp_dir, on_event))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_images_imported(report)


node_app = typer.Typer(name="node", no_args_is_help=True,
                       help="Check and configure the node gapkit runs on.")
app.add_typer(node_app, name="node")


@node_app.command("configure")
def node_configure_command(
    mirror: Annotated[str | None, typer.Option(
        "--mirror", metavar="URL",
        help="Pull through this registry: http(s)://HOST:PORT, optionally /PREFIX.")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="CA file of the mirror's certificate.")] = None,
    creds: Annotated[str | None, typer.Option("--creds", metavar="USER:PASS")] = None,
    registries: Annotated[list[str], typer.Option(
        "--registries", metavar="HOST,...",
        help="Upstreams to mirror (default: the --bundle's, else docker.io, registry.k8s.io, "
        "k8s.gcr.io, quay.io, ghcr.io, public.ecr.aws).")] = [],  # noqa: B006
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="Mirror every upstream this bundle's images come from.")] = None,
    upstream_prefix: Annotated[bool, typer.Option(
        "--upstream-prefix", help="The mirror keeps images under HOST/<upstream>/...")] = False,
    no_fallback: Annotated[bool, typer.Option(
        "--no-fallback", help="Never fall back to the upstream when the mirror fails.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="HTTPS without verification.")] = False,
    proxy: Annotated[str | None, typer.Option(
        "--proxy", metavar="URL", help="containerd pulls through this HTTP proxy.")] = None,
    no_proxy: Annotated[list[str], typer.Option(
        "--no-proxy", metavar="HOST,...", help="More NO_PROXY entries (added to the defaults).")] = [],  # noqa: B006
    peers: Annotated[list[str], typer.Option(
        "--peers", metavar="ADDR,...", help="The other nodes (kept off the proxy).")] = [],  # noqa: B006
    node_address: Annotated[list[str], typer.Option(
        "--node-address", metavar="ADDR,...", help="This node's addresses (default: hostname -I).")] = [],  # noqa: B006
    root: Annotated[Path | None, typer.Option(
        "--root", help="Take every node path under this folder (tests, preparing an image).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; change nothing.")] = False,
    no_restart: Annotated[bool, typer.Option("--no-restart", help="Never restart MicroK8s.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Point MicroK8s' containerd at a mirror (hosts.toml per upstream) and/or a proxy."""
    from gapkit.node.configure import configure_node, configure_options
    from gapkit.node.plan import LocalRunner

    options = configure_options(
        mirror, proxy, ca=ca, creds=creds, registries=registries, bundle=bundle,
        upstream_prefix=upstream_prefix, no_fallback=no_fallback, insecure=insecure,
        no_proxy=no_proxy, peers=peers, node_addresses=node_address, restart=not no_restart)
    result = _run(configure_node(LocalRunner(root), options, dry_run))
    if as_json:
        ui.print_json(result.to_json())
    else:
        ui.render_configured(result)
    result.raise_for_problems()


@node_app.command("check")
def node_check_command(
    peers: Annotated[list[str], typer.Option(
        "--peers", metavar="ADDR,...", help="Other nodes: every MicroK8s port is tried on each.")] = [],  # noqa: B006
    proxy: Annotated[str | None, typer.Option(
        "--proxy", metavar="URL", help="CONNECT through this proxy to every upstream registry.")] = None,
    registries: Annotated[list[str], typer.Option(
        "--registries", metavar="HOST,...",
        help="Upstreams to reach through --proxy (default: the bundle's, else docker.io, "
        "registry.k8s.io, quay.io); http://HOST:PORT for plain HTTP.")] = [],  # noqa: B006
    upstream_ca: Annotated[Path | None, typer.Option(
        "--upstream-ca", help="Also trust this CA for upstreams (a TLS-inspecting proxy's).")] = None,
    mirror: Annotated[str | None, typer.Option(
        "--mirror", metavar="URL", help="A registry mirror: /v2/, and with --bundle every image.")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="The mirror's CA file.")] = None,
    plain_http: Annotated[bool, typer.Option("--plain-http", help="The mirror speaks HTTP.")] = False,
    creds: Annotated[str | None, typer.Option("--creds", metavar="USER:PASS",
                                              help="The mirror's credentials.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="A bundle (or image tar, or OCI layout): its images, registries, sizes.")] = None,
    etcd: Annotated[bool, typer.Option("--etcd", help="Also port 12379 (a non-HA etcd cluster).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, metavar="S",
                                           help="Seconds to wait for each answer.")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print every check as JSON.")] = False,
) -> None:
    """Check that this node can run MicroK8s: routes, ports, peers, proxy, mirror, disk, snapd.

    Exit code 0 when no check FAILs, 1 otherwise.
    """
    from gapkit.node.check import CheckOptions, check_node, parse_creds, parse_peers, parse_registries

    options = CheckOptions(parse_peers(peers), proxy, parse_registries(registries), upstream_ca,
                           mirror, ca, plain_http, parse_creds(creds), bundle, etcd, timeout)
    report = _run(check_node(options))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_node_check(report, ui.wide_stdout())
    if not report.ok:
        raise typer.Exit(1)


@node_app.command("listen")
def node_listen_command(
    ports: Annotated[list[str], typer.Option(
        "--ports", metavar="PORT[/udp],...",
        help="Ports to hold open (default: every port MicroK8s nodes reach each other on).")] = [],  # noqa: B006
    etcd: Annotated[bool, typer.Option("--etcd", help="Also port 12379.")] = False,
    address: Annotated[str, typer.Option("--address", metavar="ADDR")] = "0.0.0.0",
    duration: Annotated[float | None, typer.Option(
        "--duration", metavar="S", min=0, help="Stop after S seconds (default: at Ctrl-C).")] = None,
) -> None:
    """Answer on MicroK8s' ports, so `gapkit node check --peers` can pass before it is installed."""
    from gapkit.node.listen import listen
    from gapkit.node.ports import node_ports, parse_ports

    chosen = parse_ports(ports) or node_ports(etcd)
    try:
        report = _run(listen(chosen, address, duration, ui.render_listening))
    except KeyboardInterrupt:
        ui.stderr().print("stopped", highlight=False)
        return
    ui.stderr().print(f"stopped; {report.connections} connection(s) answered", highlight=False)


cluster_app = typer.Typer(name="cluster", no_args_is_help=True,
                          help="Many nodes at once, over SSH: check, status (and up).")
app.add_typer(cluster_app, name="cluster")
InventoryOption = Annotated[Path, typer.Option(
    "--inventory", "-i", metavar="FILE", help="The inventory: nodes, SSH settings, images.")]


@cluster_app.command("check")
def cluster_check_command(
    inventory: InventoryOption,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, metavar="S",
                                           help="Seconds to wait for each port.")] = 2.0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Nodes at once.")] = 10,
    etcd: Annotated[bool, typer.Option("--etcd", help="Also port 12379 (a non-HA etcd cluster).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every check as JSON.")] = False,
) -> None:
    """`node check` on every node at once, and the port matrix between them; one table.

    Exit code 0 when no check FAILs, 1 otherwise.
    """
    from gapkit.cluster.check import check_cluster
    from gapkit.cluster.inventory import load_inventory

    report = _run(check_cluster(load_inventory(inventory), timeout, jobs, etcd))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_cluster_check(report, ui.wide_stdout())
    if not report.ok:
        raise typer.Exit(1)


@cluster_app.command("status")
def cluster_status_command(
    inventory: InventoryOption,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="Also count which of this bundle's images each node holds.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Nodes at once.")] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per node: reachable, MicroK8s version, images present, Ready.

    Exit code 0 when every node is reachable and Ready, 1 otherwise.
    """
    from gapkit.cluster.inventory import load_inventory
    from gapkit.cluster.status import cluster_status

    report = _run(cluster_status(load_inventory(inventory), bundle, jobs))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_cluster_status(report, ui.wide_stdout())
    if not report.ok:
        raise typer.Exit(1)


@cluster_app.command("up")
def cluster_up_command(
    inventory: InventoryOption,
    bundle: Annotated[Path, typer.Argument(help="The bundle (snaps and images).")],
    plan: Annotated[bool, typer.Option(
        "--plan", help="Print every file and command per node; change nothing.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Nodes installed at once.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="The plan or report as JSON.")] = False,
) -> None:
    """Install MicroK8s from the bundle on every node, configure containerd, form the cluster.

    Steps already done are skipped, so a rerun continues where a failed run stopped.
    """
    from gapkit.cluster.inventory import load_inventory
    from gapkit.cluster.up import up_from_inventory

    progress = None if as_json or plan else ui.cluster_up_progress
    report = _run(up_from_inventory(load_inventory(inventory), bundle, plan_only=plan,
                                    jobs=jobs, progress=progress))
    if as_json:
        ui.print_json(report.to_json())
    else:
        ui.render_cluster_up(report)


# Recent typers (0.26 on) carry click inside (typer._click) and raise their own exceptions; older
# ones raise click's own, and import click themselves, so it is only looked up when typer has
# imported it (gapkit does not depend on click: importing it would cost start-up, or fail).
_click = sys.modules.get("click")
_EXITS: tuple[type[Exception], ...] = (
    typer.Exit, *((_click.exceptions.Exit,) if _click else ()))
_INTERRUPTS: tuple[type[BaseException], ...] = (
    KeyboardInterrupt, typer.Abort, *((_click.exceptions.Abort,) if _click else ()))
_USAGE_ERRORS: tuple[type[Exception], ...] = (
    *((_click.ClickException,) if _click else ()),
    *((typer.TyperException,) if hasattr(typer, "TyperException") else ()))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into messages and exit codes; the process
    ends next."""
    try:
        _main(argv)
    finally:
        # The interpreter's last garbage collection, at exit, walks every object the imports
        # made (~15 ms of each run, a sixth of `bundle verify`'s start-up and exit). Frozen
        # objects are skipped: only cyclic garbage left at exit is no longer collected, while
        # atexit hooks and weakref.finalize callbacks (archive temp files) still run.
        gc.freeze()


#: The exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130
#: A full disk, a quota, a read-only filesystem: not bugs, whatever raised them.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _main(argv: list[str] | None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except GapkitError as exc:
        ui.error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except _EXITS as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _USAGE_ERRORS as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            ui.error(str(exc))
        sys.exit(2)
    except _INTERRUPTS:
        _interrupted()
    except Exception as exc:  # any other exception is a bug in gapkit, but a full disk
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS and not _debug["on"]:
            # a write that no store named (the stores name theirs): still the user's to fix
            where = f" {exc.filename}" if exc.filename else ""
            ui.error(f"cannot write{where}: {exc.strerror}",
                     "free some space there, or choose another place to write")
            sys.exit(1)
        if _debug["on"]:
            traceback.print_exc()
        else:
            ui.error(f"internal error: {type(exc).__name__}: {exc}",
                     "this is a bug in gapkit; run again with --debug and report the traceback")
        sys.exit(70)
    if code == INTERRUPTED:  # typer 0.26-0.28 turn Ctrl-C into this code, silently
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted() -> NoReturn:
    ui.error("interrupted; what was complete is kept, run the command again to finish")
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
