"""`gapkit/bundle.json`: what a bundle holds, recorded when it is made and checked by verify.

The OCI layout at the bundle's root is the truth for images; bundle.json says what was asked
for (the spec), what was resolved (every image with its digest, platforms and why it is there),
and every snap with both its sha256 and the sha3-384 its assertion names.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

BUNDLE_JSON = "gapkit/bundle.json"
SNAPS_FOLDER = "gapkit/snaps"
FORMAT_VERSION = 1
#: bundle.json is read whole. 4 MiB, as index.json, which lists the same images and may not
#: be larger (MAX_MANIFEST_SIZE): 12 000 images; inspect shows that many in about 100 MB.
MAX_BUNDLE_JSON_SIZE = 4 * 1024 * 1024
#: A snap's .assert file is read whole: real ones (four assertions) are about 5 KiB.
MAX_ASSERTION_SIZE = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleImage(_Model):
    reference: str
    digest: str
    media_type: str
    #: Platforms whose manifests and blobs are in the bundle (empty: a single-platform image).
    platforms: list[str] = Field(default_factory=list)
    #: Bytes of the blobs this image uses (shared blobs counted for every image using them).
    size: int
    sources: list[str] = Field(default_factory=list)
    note: str = ""


class BundleSnap(_Model):
    name: str
    #: Member path inside the bundle, e.g. `gapkit/snaps/microk8s.snap`.
    file: str
    assertion: str
    revision: str = ""
    channel: str = ""
    size: int
    sha256: str
    #: As the snap-revision assertion writes it: base64url, no padding.
    sha3_384: str


class BundleManifest(_Model):
    format: int = FORMAT_VERSION
    tool: str
    created: str
    microk8s: str | None = None
    channel: str | None = None
    snap_base: str | None = None
    platforms: list[str]
    spec: dict[str, object] = Field(default_factory=dict)
    images: list[BundleImage] = Field(default_factory=list)
    snaps: list[BundleSnap] = Field(default_factory=list)
    #: Unique blob bytes in the bundle, and what sharing saved.
    blob_bytes: int = 0
    shared_bytes_saved: int = 0
