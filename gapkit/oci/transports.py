"""skopeo-style image locations: `docker://REF`, `oci:DIR[:REF]`, `oci-archive:FILE[:REF]`,
`docker-archive:FILE[:REF]`, and the one function behind `gapkit copy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gapkit.errors import UsageError
from gapkit.oci.auth import parse_user_password
from gapkit.oci.copy import CopyReport, CopyRequest, EventHandler, copy
from gapkit.oci.model import Platform
from gapkit.oci.reference import Reference, normalise_registry
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.layout import LayoutStore
from gapkit.oci.stores.options import DEFAULT_JOBS, DEFAULT_RETRIES, DEFAULT_TIMEOUT, HostOptions

if TYPE_CHECKING:
    from gapkit.oci.stores.registry import RegistryStore

TransportName = Literal["docker", "oci", "oci-archive", "docker-archive"]
TRANSPORTS: tuple[TransportName, ...] = ("docker", "oci", "oci-archive", "docker-archive")


@dataclass(frozen=True)
class Location:
    """A parsed `transport:target[:reference]`."""

    transport: TransportName
    path: Path | None
    reference: Reference | None

    @classmethod
    def parse(cls, text: str) -> Location:
        transport, sep, rest = text.partition(":")
        if not sep or transport not in TRANSPORTS:
            raise UsageError(
                f"{text!r} does not name a transport",
                hint="write docker://REF, oci:DIR[:REF], oci-archive:FILE[:REF] "
                "or docker-archive:FILE[:REF]",
            )
        if transport == "docker":
            if not rest.startswith("//") or not rest[2:]:
                raise UsageError(f"{text!r}: write docker://REFERENCE, e.g. docker://nginx:1.27")
            return cls("docker", None, Reference.parse(rest[2:]))
        path_text, _, ref_text = rest.partition(":")
        if not path_text:
            raise UsageError(f"{text!r} names no {'folder' if transport == 'oci' else 'file'}")
        reference = Reference.parse(ref_text) if ref_text else None
        return cls(transport, Path(path_text), reference)

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.reference}"
        suffix = f":{self.reference}" if self.reference else ""
        return f"{self.transport}:{self.path}{suffix}"


@dataclass
class RegistrySettings:
    """How to reach registries: per-host options, mirrors, the Docker config to read, and how
    long to keep trying."""

    hosts: dict[str, HostOptions] = field(default_factory=dict)
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    docker_config: Path | None = None
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT

    def store(self) -> RegistryStore:
        from gapkit.oci.stores.registry import RegistryStore

        return RegistryStore(hosts=self.hosts, mirrors=self.mirrors,
                             docker_config=self.docker_config, retries=self.retries,
                             timeout=self.timeout)


async def open_store(location: Location, role: Literal["source", "destination"],
               registries: RegistrySettings) -> Store:
    if location.transport == "docker":
        return registries.store()
    assert location.path is not None
    if location.transport == "oci":
        return LayoutStore(location.path, create=role == "destination")
    archive_format: Literal["oci", "docker"] = (
        "oci" if location.transport == "oci-archive" else "docker")
    if role == "source":
        return await ArchiveStore.open(location.path)
    return ArchiveStore.create(location.path, format=archive_format)


async def plan_requests(source: Location, destination: Location, source_store: Store,
                        several: bool = False) -> list[CopyRequest]:
    """Pair source images with destination names the way skopeo does, plus whole layouts.

    `several` says the destination receives images from more than one source, so it cannot
    name them itself: each keeps its own name.
    """
    if source.reference is not None:
        if several and destination.reference is not None:
            raise UsageError(f"{destination} names one image, but several sources are given",
                             hint="copy several images into oci:DIR, oci-archive:FILE or "
                             "docker-archive:FILE, where each keeps its own name")
        return [CopyRequest(source.reference, destination.reference or source.reference)]
    if destination.reference is not None or destination.transport == "docker":
        raise UsageError(
            f"{source} holds several images: name one ({source}:REF), "
            f"or copy them all to an oci:, oci-archive: or docker-archive: destination"
        )
    images = await source_store.images()
    if not images:
        raise UsageError(f"{source} holds no named image")
    return [CopyRequest(ref, ref.with_digest(None) if ref.tag else ref) for ref in images]


async def copy_images(
    source_texts: Sequence[str],
    destination_text: str,
    registries: RegistrySettings | None = None,
    platforms: Sequence[Platform] | None = None,
    all_platforms: bool = False,
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
) -> CopyReport:
    """`gapkit copy SRC... DST`: copy between any locations, as `cp a b dir/` does.

    Images from registries share one client and one copy run, so blobs they share are fetched
    once. Without `platforms` and without `all_platforms`, multi-arch images keep only the host's
    platform (as skopeo does); the index itself is kept byte for byte either way.
    """
    registries = registries or RegistrySettings()
    sources = [Location.parse(text) for text in source_texts]
    destination = Location.parse(destination_text)
    if not sources:
        raise UsageError("name at least one source")
    chosen: frozenset[Platform] | None = None
    if not all_platforms:
        chosen = frozenset(platforms) if platforms else frozenset({Platform.host()})
    stores: list[Store] = []
    groups: dict[int, tuple[Store, list[CopyRequest]]] = {}
    registry_store: Store | None = None
    destination_store: Store | None = None
    try:
        for source in sources:
            if source.transport == "docker":
                if registry_store is None:
                    registry_store = await open_store(source, "source", registries)
                    stores.append(registry_store)
                store = registry_store
            else:
                store = await open_store(source, "source", registries)
                stores.append(store)
            requests = await plan_requests(source, destination, store, several=len(sources) > 1)
            groups.setdefault(id(store), (store, []))[1].extend(requests)
        destination_store = await open_store(destination, "destination", registries)
        report = CopyReport()
        for store, requests in groups.values():
            part = await copy(store, destination_store, requests, chosen, jobs, on_event)
            report.merge(part)
    except BaseException:
        if destination_store is not None:
            await _abort(destination_store)
        for store in stores:
            await store.close()
        raise
    await destination_store.close()
    for store in stores:
        await store.close()
    return report


async def _abort(store: Store) -> None:
    """Drop an unfinished destination: archives are removed, other stores just closed."""
    abort = getattr(store, "abort", None)
    if abort is not None:
        await abort()
    else:
        await store.close()


def _split_flag(flag: str, value: str, what: str) -> tuple[str, str]:
    key, sep, rest = value.partition("=")
    if not sep or not key or not rest:
        raise UsageError(f"--{flag} {value!r}: write --{flag} {what}")
    return key, rest


def registry_settings_from_flags(
    plain_http: Sequence[str] = (),
    ca: Sequence[str] = (),
    creds: Sequence[str] = (),
    mirrors: Sequence[str] = (),
    insecure: Sequence[str] = (),
    docker_config: Path | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
) -> RegistrySettings:
    """Build settings from `--plain-http REG`, `--ca REG=FILE`, `--creds REG=USER:PASS`,
    `--mirror UPSTREAM=URL`, `--insecure REG` (TLS without verification), `--retries N` and
    `--timeout S`."""
    options: dict[str, dict[str, object]] = {}

    def host_key(text: str) -> str:
        host = text.removeprefix("https://").removeprefix("http://").rstrip("/")
        if not host or "/" in host:
            raise UsageError(f"{text!r} is not a registry host (write HOST or HOST:PORT)")
        return normalise_registry(host)

    for host in plain_http:
        options.setdefault(host_key(host), {})["plain_http"] = True
    for host in insecure:
        options.setdefault(host_key(host), {})["skip_verify"] = True
    for item in ca:
        host, path = _split_flag("ca", item, "REGISTRY=FILE")
        if not Path(path).is_file():
            raise UsageError(f"--ca {item!r}: {path} is not a readable file")
        options.setdefault(host_key(host), {})["ca_file"] = Path(path)
    for item in creds:
        host, secret = _split_flag("creds", item, "REGISTRY=USER:PASSWORD")
        options.setdefault(host_key(host), {})["credentials"] = parse_user_password(
            secret, "--creds REGISTRY=USER:PASSWORD")
    mirror_map: dict[str, list[str]] = {}
    for item in mirrors:
        upstream, url = _split_flag("mirror", item, "UPSTREAM=URL (e.g. docker.io=http://10.0.0.5:5000)")
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--mirror {item!r}: the mirror URL must start with http:// or https://")
        mirror_map.setdefault(host_key(upstream), []).append(url.rstrip("/"))
    hosts = {host: HostOptions(**values) for host, values in options.items()}  # type: ignore[arg-type]
    return RegistrySettings(hosts, mirror_map, docker_config, retries, timeout)
