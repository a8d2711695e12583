from __future__ import annotations

import hashlib
import json

import pytest

from gapkit.errors import ManifestError
from gapkit.oci.model import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    Manifest,
    Platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _image(media_type: str | None = OCI_MANIFEST) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 7},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2,
                    "size": 9}],
    }
    if media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc, indent=7).encode()


def test_digest_is_of_the_exact_bytes_not_reserialised_json() -> None:
    raw = _image()
    manifest = Manifest.parse(raw)
    assert str(manifest.digest) == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert manifest.raw is raw
    assert manifest.digest != Digest.of(json.dumps(json.loads(raw)).encode())


def test_image_manifest_lists_config_and_layers() -> None:
    manifest = Manifest.parse(_image())
    assert not manifest.is_index
    assert [str(d.digest) for d in manifest.blobs] == [D1, D2]


def test_media_type_from_header_when_the_document_has_none() -> None:
    assert Manifest.parse(_image(None), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    assert Manifest.parse(_image(None)).media_type == OCI_MANIFEST


def test_index_selects_platforms_with_arm64_v8_normalised() -> None:
    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": D1, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": DOCKER_MANIFEST, "digest": D2, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}
    index = Manifest.parse(json.dumps(doc).encode())
    assert index.is_index
    arm = index.select(frozenset({Platform.parse("linux/arm64")}))
    assert [str(d.digest) for d in arm] == [D2]
    assert index.select(frozenset({Platform.parse("linux/arm64/v8")})) == arm
    assert [str(d.digest) for d in index.select(frozenset({Platform.parse("linux/amd64")}))] == [D1]
    assert index.select(None) == index.manifests


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_bad_platforms_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="not a platform"):
        Platform.parse(text)


def test_platform_aliases() -> None:
    assert Platform.parse("linux/x86_64") == Platform.parse("linux/amd64")
    assert Platform.parse("linux/aarch64") == Platform.parse("linux/arm64/v8")
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64"
    assert str(Platform.parse("linux/arm/v6")) == "linux/arm/v6"


def test_schema1_is_refused_with_a_clear_message() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
    with pytest.raises(ManifestError, match="schema 1") as err:
        Manifest.parse(raw, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    assert err.value.hint and "schema 2" in err.value.hint


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"mediaType": OCI_INDEX}).encode(), "no 'manifests'"),
        (json.dumps({"mediaType": "text/html"}).encode(), "not an image manifest"),
        (json.dumps({"mediaType": OCI_MANIFEST, "config": {"digest": "sha256:zz", "size": 1},
                     "layers": []}).encode(), "not a valid sha256"),
        (json.dumps({"mediaType": OCI_MANIFEST, "config": {"digest": D1, "size": -1},
                     "layers": []}).encode(), "invalid size"),
    ],
)
def test_malformed_manifests_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.parse(raw)


def test_expected_digest_is_checked() -> None:
    raw = _image()
    with pytest.raises(ManifestError, match="wrong content"):
        Manifest.parse(raw, expected=Digest.parse(D1))
