"""Hostile bundles, written byte by byte from a real one: tar bombs, lying blob names, index
cycles and fan-outs, oversized JSON, path tricks.

A bundle is read back into (header, data) parts, changed, and written again; headers tarfile
would refuse to write (base-256 sizes larger than the file, pax headers declaring exabytes) are
built by hand. Big members are holes in a sparse file, so a 100 MB member costs no disk and no
time to write. Everything here is independent of gapkit's own code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BLOCK = tarfile.BLOCKSIZE
MB = 1024 * 1024


@dataclass(frozen=True)
class Hole:
    """`size` bytes of zeros left as a hole in the file."""

    size: int


Part = bytes | Hole


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def sparse_member(name: str, size: int) -> list[Part]:
    return [header(name, size), Hole(size + (-size % BLOCK))]


def raw_header(name: str, size_field: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A ustar header with `size_field` (12 bytes) as given, e.g. base-256 `8 EB`."""
    assert len(size_field) == 12
    block = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = size_field
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def base256(size: int) -> bytes:
    return b"\x80" + size.to_bytes(11, "big")


def many_headers(prefix: str, count: int) -> bytes:
    """`count` empty regular members `prefix<i>`: headers only, 512 bytes each."""
    template = bytearray(tarfile.TarInfo(prefix + "0" * 7).tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - sum(template[len(prefix):len(prefix) + 7])
    out = bytearray()
    for i in range(count):
        digits = b"%07d" % i
        template[len(prefix):len(prefix) + 7] = digits
        template[148:156] = b"%06o\0 " % (base + sum(digits))
        out += template
        template[148:156] = b" " * 8
    return bytes(out)


def write_tar(path: Path, parts: Iterable[Part]) -> Path:
    """Write `parts` and tar's end-of-archive blocks, padded to a 10 KiB record."""
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, Hole):
                f.seek(part.size, 1)
            else:
                f.write(part)
        end = f.tell() + 2 * BLOCK
        f.write(b"\0" * (2 * BLOCK + -end % tarfile.RECORDSIZE))
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zeros_digest(size: int) -> str:
    h = hashlib.sha256()
    chunk = bytes(MB)
    left = size
    while left:
        h.update(chunk[:min(left, MB)])
        left -= min(left, MB)
    return "sha256:" + h.hexdigest()


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def index_doc(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def descriptor(digest: str, size: int, media_type: str = OCI_INDEX,
               **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


@dataclass
class Bundle:
    """A bundle as editable members: name -> data, in order, plus parts appended at the end."""

    members: dict[str, bytes]
    extra: list[Part] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Bundle:
        members: dict[str, bytes] = {}
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                if info.isfile():
                    data = tar.extractfile(info)
                    assert data is not None
                    members[info.name] = data.read()
        return cls(members)

    def copy(self) -> Bundle:
        return Bundle(dict(self.members), list(self.extra))

    @property
    def index(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.members["index.json"])
        return doc

    @property
    def bundle_json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.members["gapkit/bundle.json"])
        return doc

    def entry(self, name: str) -> dict[str, object]:
        """The index.json entry naming image `name`."""
        for entry in self.index["manifests"]:  # type: ignore[attr-defined]
            annotations = entry.get("annotations", {})
            if name in annotations.values():
                return dict(entry)
        raise KeyError(name)

    def image_manifest(self, name: str) -> tuple[str, dict[str, object]]:
        """(digest, document) of the single-platform image manifest image `name` names."""
        digest = str(self.entry(name)["digest"])
        doc = json.loads(self.members[blob_name(digest)])
        while "manifests" in doc:
            digest = doc["manifests"][0]["digest"]
            doc = json.loads(self.members[blob_name(digest)])
        return digest, doc

    def add_blob(self, data: bytes, name: str | None = None) -> str:
        digest = sha256(data)
        self.members[blob_name(name or digest)] = data
        return digest

    def rename_image(self, name: str, digest: str, size: int, media_type: str = OCI_INDEX) -> None:
        """Point index.json's entry for `name` (and bundle.json's record) at `digest`."""
        index = self.index
        for entry in index["manifests"]:  # type: ignore[attr-defined]
            if name in entry.get("annotations", {}).values():
                entry.update(digest=digest, size=size, mediaType=media_type)
        self.members["index.json"] = json.dumps(index).encode()
        record = self.bundle_json
        for image in record["images"]:  # type: ignore[attr-defined]
            if image["reference"] == name:
                image.update(digest=digest, media_type=media_type)
        self.members["gapkit/bundle.json"] = json.dumps(record).encode()

    def write(self, path: Path, before: Iterable[Part] = (),
              replace: Mapping[str, Sequence[Part]] | None = None) -> Path:
        """The bundle at `path`: `before`, the members (some replaced by raw parts), `extra`."""
        parts: list[Part] = list(before)
        for name, data in self.members.items():
            parts += (replace or {}).get(name) or [member(name, data)]
        return write_tar(path, [*parts, *self.extra])


@dataclass(frozen=True)
class Hostile:
    """A hostile bundle and what every command must say about it."""

    path: Path
    #: Texts each refusal must contain (a member name, a digest, the limit).
    culprit: tuple[str, ...]
    #: The tar itself is refused at open: every command, `copy oci-archive:` and serve included.
    at_open: bool = False
    #: Refused by the bundle reader (inspect, export, serve) but not by `copy oci-archive:`,
    #: which reads any image tar and never uses unsafe members or gapkit's own files.
    bundle_only: bool = False
    #: The images themselves are bad: export and copy must refuse.
    images_bad: bool = True
    #: A manifest is bad: serve reads every manifest at start, so it must name the culprit then.
    bad_manifest: bool = False


def sha3_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha3_384(data).digest()).decode().rstrip("=")
