"""What the reliability tests share besides their fixtures (tests/reliability/conftest.py):
the image they move, and checks that a result is byte-for-byte right (by skopeo, which verifies
every blob it reads) or absent."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.cli import gapkit
from tests.support.images import Layer
from tests.support.peers import Registry

#: Above gapkit's 1 MiB monolithic limit, so pushes of it stream through one PATCH.
BIG = 2_000_000
SMALL = 200_000
REPOSITORY = "demo/app"
TAG = "v1"


@dataclass
class Source:
    registry: Registry
    layout: Path
    digest: str
    big: Layer
    small: Layer
    #: digest -> size of every blob of the image (config and layers, not the manifest)
    blobs: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.blobs.values())


def manifest_digest(location: str) -> str:
    """The digest of the manifest skopeo reads at `location` (`oci:DIR:REF`, …)."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", location], capture_output=True,
                         check=True).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def skopeo_reads(location: str, folder: Path, *flags: str) -> str:
    """skopeo copies `location` (checking every blob's digest) and returns the manifest digest."""
    subprocess.run(["skopeo", "copy", "--quiet", *flags, location, f"dir:{folder}"],
                   capture_output=True, check=True)
    return "sha256:" + hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def dot_files(folder: Path) -> list[Path]:
    """Every file or folder under `folder` whose name starts with '.' (temp files)."""
    return sorted(p for p in folder.rglob(".*"))


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "--debug" not in stderr, stderr  # the internal-error (bug) message


def one_image_bundle(source: Source, image: str, folder: Path) -> Path:
    """`folder/bundle.tar`: an images-only bundle (linux/amd64) of `image`, fetched from the
    source registry as docker.io's mirror."""
    output = folder / "bundle.tar"
    gapkit("bundle", "create", "--no-snaps", f"--image={image}", "--platform=linux/amd64",
           f"--mirror=docker.io={source.registry.url}", "--cache", str(folder / "cache"),
           "-o", str(output))
    return output
