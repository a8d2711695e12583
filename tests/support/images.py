"""Synthetic images written as an OCI layout by hand, independent of gapkit's own writers.

Tests and benchmarks need images without the internet: each layer is a real gzip'd tar holding
one file of random bytes (incompressible, as real compressed layers are), so containerd can
unpack it and skopeo can copy it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                **extra}


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str


def make_layer(seed: int, size: int, name: str = "payload") -> Layer:
    """A gzip'd tar with one file of `size` random bytes; the same seed gives the same layer."""
    content = random.Random(seed).randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"{name}-{seed}")
        info.size = size
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    level = 1 if size < 1024 * 1024 else 0
    gz = gzip.compress(tar_bytes, compresslevel=level, mtime=0)
    return Layer(Blob(gz, OCI_LAYER_GZIP), "sha256:" + hashlib.sha256(tar_bytes).hexdigest())


@dataclass
class ImageSpec:
    """One image: its name in the layout (`ref.name`) and its layers per platform."""

    name: str
    layers: list[Layer]
    platform: str = "linux/amd64"
    #: Extra platforms for a multi-arch image: platform -> its own layers.
    others: dict[str, list[Layer]] = field(default_factory=dict)


def _image_manifest(layers: list[Layer], platform: str) -> tuple[Blob, list[Blob]]:
    os_, arch, *variant = platform.split("/")
    config_doc: dict[str, object] = {
        "architecture": arch, "os": os_,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "config": {"Cmd": ["/bin/sh"]},
    }
    if variant:
        config_doc["variant"] = variant[0]
    config = Blob(json.dumps(config_doc, sort_keys=True).encode(), OCI_CONFIG)
    manifest_doc = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    manifest = Blob(json.dumps(manifest_doc, indent=2).encode(), OCI_MANIFEST)
    return manifest, [config, *(layer.blob for layer in layers)]


def build_image(spec: ImageSpec) -> tuple[Blob, list[Blob]]:
    """The top manifest (an index for multi-arch) and every blob it needs."""
    manifest, blobs = _image_manifest(spec.layers, spec.platform)
    if not spec.others:
        return manifest, [*blobs, manifest]
    entries = []
    all_blobs: list[Blob] = []
    for platform, layers in [(spec.platform, spec.layers), *spec.others.items()]:
        child, child_blobs = _image_manifest(layers, platform)
        os_, arch, *variant = platform.split("/")
        plat: dict[str, str] = {"os": os_, "architecture": arch}
        if variant:
            plat["variant"] = variant[0]
        entries.append(child.descriptor(platform=plat))
        all_blobs += [*child_blobs, child]
    index = Blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                             "manifests": entries}, indent=3).encode(), OCI_INDEX)
    return index, [*all_blobs, index]


def write_layout(root: Path, specs: list[ImageSpec]) -> dict[str, str]:
    """Write an OCI layout holding `specs`; return name -> top manifest digest."""
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index_path = root / "index.json"
    index = (json.loads(index_path.read_text()) if index_path.exists()
             else {"schemaVersion": 2, "manifests": []})
    out: dict[str, str] = {}
    for spec in specs:
        top, blobs = build_image(spec)
        for blob in blobs:
            path = blobs_dir / blob.digest.split(":", 1)[1]
            if not path.exists():
                path.write_bytes(blob.data)
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                              != spec.name]
        index["manifests"].append(
            top.descriptor(annotations={"org.opencontainers.image.ref.name": spec.name}))
        out[spec.name] = top.digest
    index_path.write_text(json.dumps(index))
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size) if size < (64 << 20) else os.urandom(size)


def partial_bundle_blobs(cache: Path) -> dict[str, int]:
    """`sha256:…` -> size of every whole blob in the partial bundles of `cache` (what builds that
    were stopped left, see `gapkit.bundle.reuse`), read with Python's tarfile, not gapkit's.

    A blob's member is named `blobs/sha256/…` only once its bytes are all written and checked;
    until then it is `gapkit/pending/…`. A partial bundle has no end-of-archive blocks: tarfile
    stops at the end of the file.
    """
    found: dict[str, int] = {}
    for partial in sorted((cache / "partial").glob("*.tar")):
        try:
            with tarfile.open(partial) as tar:
                for member in tar:
                    if member.isreg() and member.name.startswith("blobs/sha256/"):
                        found["sha256:" + member.name.rsplit("/", 1)[1]] = member.size
        except tarfile.TarError:
            continue  # being written as we read it: the caller polls again
    return found
