"""`gapkit/bundle.json`: what a bundle holds, recorded when it is made and checked by verify.

The OCI layout at the bundle's root is the truth for images; bundle.json says what was asked
for (the spec), what was resolved (every image with its digest, platforms and why it is there),
and every snap with both its sha256 and the sha3-384 its assertion names.

gapkit/bundle/bundle_json.py describes the same fields as TypedDicts, for reading bundle.json
without pydantic: a field changed here changes there too (tests/test_bundle_json.py checks).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Where bundle.json is and its limits live beside its plain reader (what `bundle verify` reads
# it with, without pydantic); they are named here too, with the models.
from gapkit.bundle.bundle_json import BUNDLE_JSON as BUNDLE_JSON
from gapkit.bundle.bundle_json import FORMAT_VERSION as FORMAT_VERSION
from gapkit.bundle.bundle_json import MAX_ASSERTION_SIZE as MAX_ASSERTION_SIZE
from gapkit.bundle.bundle_json import MAX_BUNDLE_JSON_SIZE as MAX_BUNDLE_JSON_SIZE
from gapkit.bundle.bundle_json import SNAPS_FOLDER as SNAPS_FOLDER


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
