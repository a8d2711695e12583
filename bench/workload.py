"""The benchmark's workload: 12 images named like MicroK8s' own, written as an OCI layout.

Shape (at the default 1000 MB, see BENCHMARKS.md): 12 images (calico cni/node/kube-controllers,
coredns as an amd64+arm64 index, pause, metrics-server, the ingress controller,
hostpath-provisioner, busybox, 3 workload images), 57 unique layers of 100 B to 80 MB, about
1 GB unique and 1.1 GB without sharing: base layers are shared between images.

Layers are real gzip'd tars of random (incompressible) bytes, as `tests.support.images.make_layer`
writes them. Small layers come from `make_layer` itself; layers of 1 MiB and more take a
streaming path (`write_big_layer`) that writes the same format (one file in a PAX tar, gzip
level 0) straight into the layout at a few hundred MB/s and in constant memory, so a 1 GB
workload or a single 1 GB layer takes seconds, not minutes. The manifests, configs and
`index.json` come from `tests.support.images.write_layout`.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.support.images import (
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Blob,
    ImageSpec,
    Layer,
    build_image,
    make_layer,
    write_layout,
)
from tests.support.peers import Registry

MB = 1_000_000
MiB = 1 << 20
#: Layers below this size are made by `make_layer` (gzip level 1, as the tests make them).
STREAM_THRESHOLD = MiB
#: Smallest layer, whatever the scale.
MIN_LAYER_BYTES = 100

# Shared base layers (MB): each is one layer object reused by several images.
BASES: dict[str, float] = {"ubi-minimal": 30, "distroless": 1.5, "distroless-arm64": 1.5,
                           "alpine": 3.5, "debian-slim": 18}

#: name in the layout and in the registry -> layers (MB, or the name of a base layer).
#: A dict value is a multi-arch image: platform -> layers.
IMAGES: dict[str, list[float | str] | dict[str, list[float | str]]] = {
    "docker.io/calico/cni:v3.28.1": ["ubi-minimal", 70, 12, 0.0001],
    "docker.io/calico/node:v3.28.1": ["ubi-minimal", 80, 80, 60, 8, 0.5, 0.002, 0.01],
    "docker.io/calico/kube-controllers:v3.28.1": ["ubi-minimal", 45, 2],
    "docker.io/coredns/coredns:1.11.3": {
        "linux/amd64": ["distroless", 25, 0.0003],
        "linux/arm64": ["distroless-arm64", 24, 0.0003],
    },
    "registry.k8s.io/pause:3.10": [0.3],
    "registry.k8s.io/metrics-server/metrics-server:v0.7.2": ["distroless", 21, 0.5],
    "registry.k8s.io/ingress-nginx/controller:v1.11.2":
        ["alpine", 60, 30, 20, 12, 8, 4, 1, 0.2, 0.05, 0.001],
    "docker.io/cdkbot/hostpath-provisioner:1.5.0": ["distroless", 10, 0.02],
    "docker.io/library/busybox:1.36.1": [2.1],
    "docker.io/library/nginx:1.27.3": ["debian-slim", 50, 25, 0.01, 0.001, 0.002, 0.003],
    "docker.io/library/postgres:16.6":
        ["debian-slim", 80, 80, 65, 30, 9, 4, 1, 0.1, 0.002, 0.0015],
    "docker.io/library/redis:7.4.2": ["debian-slim", 35, 5, 0.004, 0.002],
}
BIG_IMAGE = "docker.io/bench/big-layer:1"


def design_unique_mb() -> float:
    """MB of unique layers the table above adds up to; `--size-mb` scales every layer by
    `size_mb / design_unique_mb()`."""
    total = sum(BASES.values())
    for layers in IMAGES.values():
        for items in (layers.values() if isinstance(layers, dict) else [layers]):
            total += sum(item for item in items if not isinstance(item, str))
    return total


@dataclass
class ImageInfo:
    """One image of the workload, as written to the source layout."""

    name: str
    #: The OCI layout that holds it (the big-layer image has a layout of its own, so that
    #: copying the whole workload layout copies only the 12 images).
    layout: Path
    #: Top manifest digest (the index for a multi-arch image).
    digest: str
    #: Every blob the image needs (layers, configs, manifests), digest -> size.
    blobs: dict[str, int]
    platforms: list[str]
    #: Digests of its manifests (the top one and, for an index, each platform's).
    manifests: list[str] = field(default_factory=list)

    @property
    def repo_path(self) -> str:
        """`calico/cni:v3.28.1`: the name in the benchmark's registry (the host part dropped)."""
        return self.name.split("/", 1)[1]

    @property
    def repo(self) -> str:
        return self.repo_path.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.repo_path.rsplit(":", 1)[1]

    @property
    def layers_and_configs(self) -> dict[str, int]:
        return {d: s for d, s in self.blobs.items() if d not in self.manifests}


@dataclass
class Workload:
    layout: Path
    images: list[ImageInfo]
    #: The one-big-layer image, when asked for; not part of `images`.
    big: ImageInfo | None = None
    unique_layers: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def unique_bytes(self, images: list[ImageInfo] | None = None) -> int:
        blobs: dict[str, int] = {}
        for image in self.images if images is None else images:
            blobs.update(image.blobs)
        return sum(blobs.values())

    def bytes_without_sharing(self) -> int:
        return sum(sum(i.blobs.values()) for i in self.images)


# -- layers ---------------------------------------------------------------------------------------

class _HashingWriter:
    """Write raw-deflate stored blocks of a gzip member to a file, hashing what is written."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.gz_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.crc = 0
        self.tar_size = 0
        self.size = 0
        # gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as Python's)
        self._emit(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def _emit(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.gz_hash.update(data)
        self.size += len(data)

    def write_tar(self, data: bytes | memoryview) -> None:
        """Append tar bytes as non-final stored deflate blocks (at most 65535 bytes each)."""
        self.tar_hash.update(data)
        self.crc = zlib.crc32(data, self.crc)
        self.tar_size += len(data)
        view = memoryview(data)
        for start in range(0, len(view), 0xFFFF):
            block = view[start:start + 0xFFFF]
            self._emit(struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF))
            self._emit(block)

    def finish(self) -> None:
        self._emit(b"\x01\x00\x00\xff\xff")  # an empty final stored block
        self._emit(struct.pack("<II", self.crc & 0xFFFFFFFF, self.tar_size & 0xFFFFFFFF))


class FileBlob(Blob):
    """A blob already written into the layout: `write_layout` skips writing a blob whose file
    exists, so only its digest and size are needed here, not its bytes."""

    _digest: str
    _size: int

    def __init__(self, digest: str, size: int, media_type: str) -> None:
        super().__init__(b"", media_type)
        object.__setattr__(self, "_digest", digest)
        object.__setattr__(self, "_size", size)

    @property
    def digest(self) -> str:
        return self._digest

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self._digest, "size": self._size, **extra}


def write_big_layer(blobs_dir: Path, seed: int, size: int, name: str = "payload") -> Layer:
    """Stream a layer like `make_layer`'s (one file of `size` random bytes in a PAX tar, gzip'd
    at level 0) straight into `blobs_dir`; the same seed gives the same layer."""
    info = tarfile.TarInfo(f"{name}-{seed}")
    info.size = size
    info.mtime = 0
    header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    # AES-CTR keyed by the seed: deterministic, incompressible, ~8 GB/s.
    key = hashlib.sha256(f"gapkit-bench-{seed}".encode()).digest()
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(MiB)
    tmp = blobs_dir / f".bench-layer-{seed}"
    with open(tmp, "wb") as f:
        out = _HashingWriter(f)
        out.write_tar(header)
        left = size
        while left:
            n = min(left, MiB)
            out.write_tar(keystream.update(zeros[:n]))
            left -= n
        tar_len = len(header) + size
        padding = (-size) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
        padding += (-(tar_len + padding)) % tarfile.RECORDSIZE
        out.write_tar(bytes(padding))
        out.finish()
    digest = "sha256:" + out.gz_hash.hexdigest()
    tmp.rename(blobs_dir / digest.split(":", 1)[1])
    return Layer(FileBlob(digest, out.size, OCI_LAYER_GZIP), "sha256:" + out.tar_hash.hexdigest())


# -- the workload -----------------------------------------------------------------------------

def _scaled(mb: float, scale: float) -> int:
    return max(MIN_LAYER_BYTES, int(mb * MB * scale))


def build_workload(root: Path, size_mb: float = 1000, big_layer_mb: int = 0) -> Workload:
    """Write the source OCI layout at `root` and describe what it holds."""
    scale = size_mb / design_unique_mb()
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)

    # Every distinct layer: key -> (seed, bytes). Bases by name; the others by position.
    wanted: dict[str, tuple[int, int]] = {}
    for seed, (base, mb) in enumerate(BASES.items(), start=1):
        wanted[base] = (seed, _scaled(mb, scale))
    plans: dict[str, dict[str, list[str]]] = {}
    for name, layers in IMAGES.items():
        per_platform = layers if isinstance(layers, dict) else {"linux/amd64": layers}
        plans[name] = {}
        for platform, items in per_platform.items():
            keys: list[str] = []
            for item in items:
                if isinstance(item, str):
                    keys.append(item)
                else:
                    key = f"{name}/{platform}/{len(keys)}"
                    wanted[key] = (len(wanted) + 1, _scaled(item, scale))
                    keys.append(key)
            plans[name][platform] = keys

    def make(key: str) -> tuple[str, Layer]:
        seed, size = wanted[key]
        if size < STREAM_THRESHOLD:
            return key, make_layer(seed, size)
        return key, write_big_layer(blobs_dir, seed, size)

    # Biggest first, on two threads: hashing, AES and zlib.crc32 release the GIL.
    order = sorted(wanted, key=lambda k: -wanted[k][1])
    with ThreadPoolExecutor(2) as pool:
        made = dict(pool.map(make, order))

    specs: list[ImageSpec] = []
    for name, by_platform in plans.items():
        (first, first_keys), *others = by_platform.items()
        specs.append(ImageSpec(name, [made[k] for k in first_keys], first,
                               {p: [made[k] for k in ks] for p, ks in others}))
    digests = write_layout(root, specs)
    big_spec = None
    big_root = root.with_name(root.name + "-big")
    if big_layer_mb > 0:
        (big_root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        big_spec = ImageSpec(BIG_IMAGE, [write_big_layer(big_root / "blobs" / "sha256", 10_000,
                                                         big_layer_mb * MiB, "big")])
        digests.update(write_layout(big_root, [big_spec]))

    def info(spec: ImageSpec) -> ImageInfo:
        _top, blobs = build_image(spec)
        platforms = [spec.platform, *spec.others]
        return ImageInfo(spec.name, big_root if spec is big_spec else root, digests[spec.name],
                         {b.digest: _blob_size(b) for b in blobs}, platforms,
                         [b.digest for b in blobs if b.media_type in (OCI_MANIFEST, OCI_INDEX)])

    return Workload(root, [info(s) for s in specs], info(big_spec) if big_spec else None,
                    unique_layers=len(wanted))


def _blob_size(blob: Blob) -> int:
    size = blob.descriptor()["size"]
    assert isinstance(size, int)
    return size


def push_workload(workload: Workload, registry: Registry, include_big: bool = True) -> None:
    """Push every image (all platforms) into `registry` with skopeo, two at a time."""
    images = list(workload.images)
    if include_big and workload.big is not None:
        images.append(workload.big)

    def push(image: ImageInfo) -> None:
        try:
            registry.push_layout(image.layout, image.name, image.repo_path)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"skopeo could not push {image.name}: "
                               f"{exc.stderr.decode(errors='replace')[-2000:]}") from None

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(push, images))


def describe(workload: Workload) -> dict[str, Any]:
    """The workload's shape, for the report."""
    return {
        "images": len(workload.images),
        "unique_layers": workload.unique_layers,
        "unique_mb": round(workload.unique_bytes() / MB, 1),
        "mb_without_sharing": round(workload.bytes_without_sharing() / MB, 1),
        "big_layer_mb": round(workload.unique_bytes([workload.big]) / MB, 1) if workload.big else 0,
        "names": [i.name for i in workload.images],
    }


def index_digests(layout: Path) -> dict[str, str]:
    """name -> digest of the images an OCI layout's index.json names (OCI's annotation, then
    containerd's)."""
    doc = json.loads((layout / "index.json").read_text())
    out: dict[str, str] = {}
    for entry in doc.get("manifests", []):
        notes = entry.get("annotations") or {}
        name = notes.get("org.opencontainers.image.ref.name") or notes.get("io.containerd.image.name")
        if name:
            out[name] = entry["digest"]
    return out
