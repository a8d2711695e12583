"""bundle.json read without pydantic: the same fields as the models, and never another answer.

`exact_bundle_json` may only say "not exactly as gapkit writes it" (None), or return what the
models would: `BundleManifest.model_validate_json(data).model_dump()`.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gapkit.bundle.bundle_json import (
    BundleJson,
    ImageJson,
    SnapJson,
    exact_bundle_json,
    spelled_fields,
)
from gapkit.bundle.model import BundleImage, BundleManifest, BundleSnap

SHAPES = {BundleImage: ImageJson, BundleSnap: SnapJson, BundleManifest: BundleJson}


def spelled(annotation: Any) -> str:
    """A model field's type, written as bundle_json.py's TypedDicts write it."""
    if annotation in SHAPES:
        return SHAPES[annotation].__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else spelled(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(spelled(a) for a in args)}]"
    return str(annotation.__name__)


def test_the_typed_dicts_have_the_models_fields_in_order_with_their_types() -> None:
    for model, shape in SHAPES.items():
        fields = {name: spelled(f.annotation) for name, f in model.model_fields.items()}
        assert list(spelled_fields(shape).items()) == list(fields.items()), model.__name__


def written() -> dict[str, Any]:
    """bundle.json as `bundle create` writes it (its model_dump_json), as plain values."""
    manifest = BundleManifest(
        tool="gapkit 0.1.0", created="2026-11-29T00:00:00+00:00", microk8s="1.32",
        channel="1.32/stable", snap_base="core22", platforms=["linux/amd64", "linux/arm64/v8"],
        spec={"microk8s": "1.32", "addons": ["dns"], "timeout": 30.0, "retries": 5,
              "nested": {"a": [None, True, 1.5e-7, "é"]}},
        images=[BundleImage(reference="docker.io/calico/cni:v3.25.0", digest="sha256:" + "a" * 64,
                            media_type="application/vnd.oci.image.index.v1+json",
                            platforms=["linux/amd64"], size=2**40, sources=["core", "addon dns"],
                            note="naïve ☃"),
                BundleImage(reference="registry.k8s.io/pause:3.7", digest="sha256:" + "b" * 64,
                            media_type="application/vnd.oci.image.manifest.v1+json", size=0)],
        snaps=[BundleSnap(name="microk8s", file="gapkit/snaps/microk8s.snap",
                          assertion="gapkit/snaps/microk8s.assert", revision="7394",
                          channel="1.32/stable", size=180_000_000, sha256="c" * 64,
                          sha3_384="d" * 64)],
        blob_bytes=123, shared_bytes_saved=4)
    return json.loads(manifest.model_dump_json(indent=2))


def models_answer(data: bytes) -> dict[str, Any] | None:
    try:
        return BundleManifest.model_validate_json(data).model_dump()
    except ValueError:
        return None


def test_what_bundle_create_writes_is_read_without_the_models() -> None:
    for record in (written(), {**written(), "microk8s": None, "channel": None, "snap_base": None,
                               "images": [], "snaps": [], "spec": {}}):
        data = json.dumps(record, indent=2, ensure_ascii=False).encode()
        assert exact_bundle_json(data) == models_answer(data)
        assert exact_bundle_json(data) is not None


def agrees(data: bytes) -> None:
    plain = exact_bundle_json(data)
    assert plain is None or plain == models_answer(data), data


def test_anything_else_is_left_to_the_models() -> None:
    base = json.dumps(written(), ensure_ascii=False)
    changed = [
        base.replace('"blob_bytes": 123', '"blob_bytes": true'),
        base.replace('"blob_bytes": 123', '"blob_bytes": 123.0'),
        base.replace('"blob_bytes": 123', '"blob_bytes": "123"'),
        base.replace('"timeout": 30.0', '"timeout": NaN'),
        base.replace('"timeout": 30.0', '"timeout": 1e400'),
        base.replace('"tool": "gapkit 0.1.0"', '"tool": "\\ud800"'),
        base.replace('"tool": "gapkit 0.1.0"', '"tool": "\\ud83d\\ude00"'),
        base.replace('"tool": "gapkit 0.1.0"', '"tool": "a", "tool": "b"'),
        base.replace('"note": "naïve ☃"', '"note": null'),
        base.replace('"format": 1, ', ""),
        base.replace('"format": 1', '"format": 1, "extra": 2'),
    ]
    assert base not in changed
    for data in [*changed, "\ufeff" + base, base + " x", "[]", "null", "", "{" * 100_000]:
        agrees(data.encode())
        assert exact_bundle_json(data.encode()) is None
    agrees(base.replace('"blob_bytes": 123', '"blob_bytes": 1180591620717411303424').encode())
    agrees(base.encode("utf-16"))
    agrees(b"\xff" + base.encode())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """bundle.json as gapkit writes it, with a few values replaced, fields dropped or added."""
    record = written()
    for _ in range(draw(st.integers(1, 3))):
        places = [record, *(item for key in ("images", "snaps") if isinstance(record.get(key), list)
                            for item in record[key] if isinstance(item, dict))]
        target = draw(st.sampled_from(places))
        key = draw(st.sampled_from(sorted(target)) | st.text(max_size=4))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(JSON)
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_a_changed_bundle_json_gets_the_models_answer_or_goes_to_them(data: bytes) -> None:
    agrees(data)
