"""The OCI vocabulary as plain values: digests, platforms, descriptors, manifests.

Manifests keep their exact bytes: a digest is always computed on the bytes as received,
never on re-serialised JSON, so an index copied by gapkit still resolves by its digest.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gapkit.errors import InvalidReference, ManifestError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_MEDIA_TYPES = INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES
SCHEMA1_MEDIA_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

#: Manifests larger than this are refused: real ones are a few KiB.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_HEX = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, order=True)
class Digest:
    """A content digest such as `sha256:2f...`; only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidReference(f"{text!r} is not a digest: it has no 'algorithm:' prefix")
        length = _HEX.get(algorithm)
        if length is None:
            raise InvalidReference(
                f"{text!r} is not a digest gapkit can check: algorithm {algorithm!r} "
                "is not sha256 or sha512"
            )
        if len(hexpart) != length or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise InvalidReference(
                f"{text!r} is not a valid {algorithm} digest: it needs {length} lower-case hex digits"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    @property
    def encoded(self) -> str:
        return self.hex

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True, order=True)
class Platform:
    """`os/architecture[/variant]`, normalised the way containerd does (arm64 means arm64/v8)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidReference(
                f"{text!r} is not a platform",
                hint="write os/architecture[/variant], for example linux/amd64 or linux/arm64/v8",
            )
        return cls.normalised(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def normalised(cls, os: str, architecture: str, variant: str = "") -> Platform:
        arch = _ARCH_ALIASES.get(architecture, architecture)
        if architecture == "armel" and not variant:
            variant = "v6"
        variant = variant or _DEFAULT_VARIANT.get(arch, "")
        return cls(os, arch, variant)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls.normalised(
            str(data.get("os", "")), str(data.get("architecture", "")),
            str(data.get("variant", "") or ""),
        )

    @classmethod
    def host(cls) -> Platform:
        return cls.normalised("linux", _platform.machine().lower())

    def matches(self, other: Platform) -> bool:
        return self == other

    def __str__(self) -> str:
        if self.variant and self.variant != _DEFAULT_VARIANT.get(self.architecture):
            return f"{self.os}/{self.architecture}/{self.variant}"
        return f"{self.os}/{self.architecture}"


@dataclass(frozen=True)
class Descriptor:
    """What a manifest says about a piece of content: its type, digest and size."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: a descriptor is not a JSON object")
        try:
            digest = Digest.parse(str(data["digest"]))
            size = data["size"]
            media_type = data.get("mediaType", "")
        except KeyError as exc:
            raise ManifestError(f"{where}: a descriptor has no {exc.args[0]!r}") from None
        except InvalidReference as exc:
            raise ManifestError(f"{where}: {exc.message}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: descriptor {digest} has an invalid size {size!r}")
        platform = data.get("platform")
        annotations = data.get("annotations") or {}
        return cls(
            media_type=str(media_type),
            digest=digest,
            size=size,
            platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
            annotations={str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, dict) else {},
            urls=tuple(str(u) for u in data.get("urls") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type, "digest": str(self.digest), "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @property
    def is_foreign(self) -> bool:
        """Non-distributable layers (Windows base layers) are fetched from their URLs, not copied."""
        return bool(self.urls) and ("foreign" in self.media_type
                                    or "nondistributable" in self.media_type)


@dataclass(frozen=True)
class Manifest:
    """An image manifest or an index, with its exact bytes and their digest."""

    raw: bytes
    media_type: str
    digest: Digest
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None, where: str = "manifest",
              expected: Digest | None = None) -> Manifest:
        """Parse `raw`; `media_type` is the Content-Type or descriptor type, when known.

        When `expected` is given the bytes must hash to it (a manifest fetched by digest).
        """
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"{where} is {len(raw)} bytes, larger than any real manifest")
        digest = Digest("sha256", hashlib.sha256(raw).hexdigest())
        if expected is not None:
            if expected.algorithm != "sha256":
                digest = Digest(expected.algorithm, hashlib.new(expected.algorithm, raw).hexdigest())
            if digest != expected:
                raise ManifestError(
                    f"{where} has the wrong content: expected {expected}, it hashes to {digest}",
                    hint="the source is damaged or is not serving what it claims",
                )
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise ManifestError(f"{where} nests JSON arrays or objects too deep to read") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"{where} is not a JSON object")
        declared = doc.get("mediaType")
        kind = _kind(media_type, declared if isinstance(declared, str) else None, doc, where)
        if kind in SCHEMA1_MEDIA_TYPES:
            raise ManifestError(
                f"{where} is a Docker schema 1 manifest, which gapkit does not copy",
                hint="schema 1 was deprecated in 2017; rebuild or re-push the image with a current "
                "client so the registry serves schema 2 or OCI",
            )
        raw_annotations = doc.get("annotations")
        annotations = ({str(k): str(v) for k, v in raw_annotations.items()}
                       if isinstance(raw_annotations, dict) else {})
        if kind in INDEX_MEDIA_TYPES:
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise ManifestError(f"{where}: the index has no 'manifests' list")
            manifests = tuple(Descriptor.from_json(d, where) for d in entries)
            return cls(raw, kind, digest, None, (), manifests, annotations)
        config = Descriptor.from_json(doc.get("config"), where)
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise ManifestError(f"{where}: the manifest has no 'layers' list")
        layers = tuple(Descriptor.from_json(d, where) for d in layers_doc)
        return cls(raw, kind, digest, config, layers, (), annotations)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """The config and layers of an image manifest (empty for an index)."""
        return ((self.config,) if self.config else ()) + self.layers

    def descriptor(self, **extra: Any) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw), **extra)

    def select(self, platforms: frozenset[Platform] | None) -> tuple[Descriptor, ...]:
        """The index entries for `platforms` (all entries when `platforms` is None)."""
        if platforms is None:
            return self.manifests
        return tuple(d for d in self.manifests if d.platform is not None and d.platform in platforms)


def _kind(header: str | None, declared: str | None, doc: Mapping[str, Any], where: str) -> str:
    header = (header or "").split(";")[0].strip() or None
    if header in SCHEMA1_MEDIA_TYPES or declared in SCHEMA1_MEDIA_TYPES or doc.get(
        "schemaVersion"
    ) == 1:
        return DOCKER_SCHEMA1
    for candidate in (declared, header):
        if candidate in MANIFEST_MEDIA_TYPES:
            return candidate
    if declared or (header and header not in ("application/json", "text/plain")):
        raise ManifestError(
            f"{where} has media type {declared or header!r}, which is not an image manifest or index"
        )
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc or "config" in doc:
        return OCI_MANIFEST
    raise ManifestError(f"{where} is neither an image manifest nor an index")
