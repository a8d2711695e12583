"""`gapkit registry push`: a bundle (or any layout or archive) into the site's own registry.

Two layouts, as operators run mirrors:

- flat (the seed guide's way): `docker.io/calico/cni:v3.25.0` becomes `HOST/calico/cni:v3.25.0`;
  every upstream's images share one namespace, so two upstreams with the same path collide, and
  that is an error naming both;
- `--upstream-prefix`: `HOST/docker.io/calico/cni:v3.25.0`; nothing can collide, and nodes use
  `override_path` to reach each upstream's folder.

Either way, each node needs one `hosts.toml` per upstream; the push returns their text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gapkit.errors import UsageError
from gapkit.node.hosts_toml import Mirror, render, write_hosts_dir
from gapkit.oci.auth import parse_user_password
from gapkit.oci.copy import CopyReport, CopyRequest, EventHandler, copy
from gapkit.oci.model import Platform
from gapkit.oci.reference import Reference, Repository, is_registry_host
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.options import DEFAULT_JOBS, DEFAULT_RETRIES, DEFAULT_TIMEOUT, HostOptions
from gapkit.oci.transports import RegistrySettings

#: Where MicroK8s reads hosts.toml files (its containerd `config_path`).
MICROK8S_CERTS_D = "/var/snap/microk8s/current/args/certs.d"


@dataclass(frozen=True)
class PushTarget:
    """`HOST[:PORT][/PREFIX]`: the registry to push to and an optional path prefix."""

    host: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str, flag: str = "--to", hint: str | None = None,
              shown: str | None = None) -> PushTarget:
        """Check host and prefix; errors name `flag` and `shown` (the text as the user gave it)."""
        cleaned = text.removeprefix("https://").removeprefix("http://").strip("/")
        host, _, prefix = cleaned.partition("/")
        hint = hint or "for example --to 10.0.0.5:5000 or --to registry.example/mirror"
        shown = shown or text
        if not is_registry_host(host):
            raise UsageError(f"{flag} {shown!r}: {host!r} is not a registry host (HOST[:PORT])",
                             hint=hint)
        if prefix:
            try:
                Repository.parse(f"{host}/{prefix}")
            except UsageError as exc:
                raise UsageError(f"{flag} {shown!r}: the prefix is not valid: {exc.message}",
                                 hint=hint) from None
        return cls(host, prefix)

    def path(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def destination_for(ref: Reference, target: PushTarget, upstream_prefix: bool) -> Reference:
    if upstream_prefix:
        if ":" in ref.registry:
            raise UsageError(
                f"{ref}: its registry {ref.registry} has a port, which cannot be a path "
                "component under --upstream-prefix", hint="push it without --upstream-prefix")
        path = target.path(ref.registry, ref.path)
    else:
        path = target.path(ref.path)
    return Reference(Repository(target.host, path), ref.tag, None if ref.tag else ref.digest)


@dataclass
class PushReport:
    target: PushTarget
    copied: CopyReport
    #: upstream registry -> the text of its hosts.toml on every node
    hosts_toml: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"target": self.target.host + (f"/{self.target.prefix}" if self.target.prefix else ""),
                **self.copied.to_json(), "hosts_toml": self.hosts_toml}


def host_options(plain_http: bool = False, ca: Path | None = None, creds: str | None = None,
                 insecure: bool = False) -> HostOptions:
    """The push target's connection settings from `--plain-http`, `--ca`, `--creds USER:PASS`."""
    credentials = parse_user_password(creds) if creds is not None else None
    if ca is not None and not ca.is_file():
        raise UsageError(f"--ca {ca}: not a readable file")
    return HostOptions(plain_http=plain_http, ca_file=ca, skip_verify=insecure,
                       credentials=credentials)


def plan_push(images: list[Reference], target: PushTarget,
              upstream_prefix: bool) -> list[CopyRequest]:
    """Each image's name in the target; a flat collision between upstreams is an error."""
    requests: list[CopyRequest] = []
    seen: dict[Reference, Reference] = {}
    for ref in images:
        source = ref.with_digest(None) if ref.tag else ref
        destination = destination_for(source, target, upstream_prefix)
        other = seen.get(destination)
        if other is not None and other != source:
            raise UsageError(
                f"{other} and {source} would both be pushed as {destination}",
                hint="push with --upstream-prefix to keep each upstream in its own folder")
        seen[destination] = source
        requests.append(CopyRequest(source, destination))
    return requests


def hosts_files(upstreams: list[str], target: PushTarget, scheme: str, upstream_prefix: bool,
                ca: bool, credentials: tuple[str, str] | None, skip_verify: bool = False,
                *, fallback: bool = True) -> dict[str, str]:
    """The hosts.toml each node needs for each upstream, for this target and layout.

    The CA is named `ca.crt`, beside hosts.toml: containerd (1.5 and newer) reads a relative
    path from the hosts.toml's own folder, so one file works wherever certs.d is (a node, an
    image prepared under a root folder, `ctr --hosts-dir`). `fallback=False` keeps containerd
    off the upstream when the mirror fails (see `render`).
    """
    out = {}
    for upstream in sorted(upstreams):
        folder = target.path(upstream) if upstream_prefix else target.prefix
        if folder:
            mirror_url, override = f"{scheme}://{target.host}/v2/{folder}", True
        else:
            mirror_url, override = f"{scheme}://{target.host}", False
        ca_path = "ca.crt" if ca else None
        mirror = Mirror(mirror_url, ca=ca_path, skip_verify=skip_verify, override_path=override,
                        credentials=credentials)
        out[upstream] = render(upstream, [mirror], fallback=fallback)
    return out


async def push_images(
    source: Store,
    images: list[Reference],
    target: PushTarget,
    options: HostOptions,
    upstream_prefix: bool = False,
    platforms: list[Platform] | None = None,
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
) -> PushReport:
    """Push `images` of `source` to `target`; the registry skips blobs it has already."""
    requests = plan_push(images, target, upstream_prefix)
    destination = RegistrySettings(hosts={target.host: options}, retries=retries,
                                   timeout=timeout).store()
    try:
        copied = await copy(source, destination, requests, platforms, jobs, on_event,
                            present_only=platforms is None)
    finally:
        await destination.close()
    scheme = "http" if options.plain_http else "https"
    upstreams = sorted({r.source.registry for r in requests})
    hosts = hosts_files(upstreams, target, scheme, upstream_prefix, options.ca_file is not None,
                        options.credentials, options.skip_verify)
    return PushReport(target, copied, hosts)


async def push_source(
    source_path: Path,
    target_text: str,
    options: HostOptions,
    upstream_prefix: bool = False,
    platforms: list[Platform] | None = None,
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
    hosts_dir: Path | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
) -> PushReport:
    """`gapkit registry push SOURCE --to TARGET`: SOURCE is a bundle, layout or image tar.

    With `hosts_dir`, the hosts.toml files (and the CA beside each) are also written under it:
    a certs.d folder to copy to the nodes, or to use with `ctr image pull --hosts-dir`.
    """
    # Imported here: it reads bundle.json with pydantic, which `node configure` (importing
    # this module for hosts_files) does not need unless it is given a bundle.
    from gapkit.bundle.sources import open_image_source

    target = PushTarget.parse(target_text)
    opened = await open_image_source(source_path)
    try:
        images = await opened.store.images()
        if not images:
            raise UsageError(f"{source_path} holds no named image")
        report = await push_images(opened.store, images, target, options, upstream_prefix,
                                   platforms or opened.platforms, jobs, on_event, retries,
                                   timeout)
    finally:
        await opened.store.close()
    if hosts_dir is not None:
        write_hosts_dir(hosts_dir, report.hosts_toml, options.ca_file)
    return report
