"""`gapkit/bundle.json` without pydantic: where it is, its limits, its shape, and a reader for
it as gapkit writes it.

`bundle verify` runs on every bundle that crosses the gap, and importing pydantic and building
the models of gapkit/bundle/model.py was a quarter of its start-up. A bundle.json that `bundle
create` wrote holds every field with exactly the JSON type the models declare: `exact_bundle_json`
reads such a file into plain values, and returns None for anything else (a field missing or
extra, a value pydantic would coerce or refuse), which then goes to the models. So what is
accepted, and every message about what is not, stays the models'.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, ForwardRef, TypedDict, cast

BUNDLE_JSON = "gapkit/bundle.json"
SNAPS_FOLDER = "gapkit/snaps"
FORMAT_VERSION = 1
#: bundle.json is read whole. 4 MiB, as index.json, which lists the same images and may not
#: be larger (MAX_MANIFEST_SIZE): 12 000 images; inspect shows that many in about 100 MB.
MAX_BUNDLE_JSON_SIZE = 4 * 1024 * 1024
#: A snap's .assert file is read whole: real ones (four assertions) are about 5 KiB.
MAX_ASSERTION_SIZE = 1024 * 1024


# The fields of model.py's BundleImage, BundleSnap and BundleManifest, in their order, with
# their types (tests/test_bundle_json.py holds the two together).

class ImageJson(TypedDict):
    reference: str
    digest: str
    media_type: str
    platforms: list[str]
    size: int
    sources: list[str]
    note: str


class SnapJson(TypedDict):
    name: str
    file: str
    assertion: str
    revision: str
    channel: str
    size: int
    sha256: str
    sha3_384: str


class BundleJson(TypedDict):
    format: int
    tool: str
    created: str
    microk8s: str | None
    channel: str | None
    snap_base: str | None
    platforms: list[str]
    spec: dict[str, object]
    images: list[ImageJson]
    snaps: list[SnapJson]
    blob_bytes: int
    shared_bytes_saved: int


_Check = Callable[[object], bool]


def _is_str(value: object) -> bool:
    return type(value) is str


def _is_int(value: object) -> bool:
    return type(value) is int  # a bool is an int to Python, not to JSON


def _is_str_list(value: object) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _is_record(fields: dict[str, _Check]) -> _Check:
    def check(value: object) -> bool:
        return (type(value) is dict and value.keys() == fields.keys()
                and all(is_kind(value[name]) for name, is_kind in fields.items()))
    return check


def _is_list_of(is_item: _Check) -> _Check:
    return lambda value: type(value) is list and all(is_item(v) for v in value)


_KINDS: dict[str, _Check] = {
    "str": _is_str,
    "int": _is_int,
    "str | None": lambda value: value is None or type(value) is str,
    "list[str]": _is_str_list,
    "dict[str, object]": lambda value: type(value) is dict,
}


def spelled_fields(shape: type) -> dict[str, str]:
    """A TypedDict's fields and their types as written above (TypedDict keeps them as forward
    references: see the __future__ import)."""
    return {name: kind.__forward_arg__ if isinstance(kind, ForwardRef) else str(kind)
            for name, kind in shape.__annotations__.items()}


def _record_check(shape: type) -> _Check:
    return _is_record({name: _KINDS[kind] for name, kind in spelled_fields(shape).items()})


_KINDS["list[ImageJson]"] = _is_list_of(_record_check(ImageJson))
_KINDS["list[SnapJson]"] = _is_list_of(_record_check(SnapJson))
_is_bundle_json = _record_check(BundleJson)

#: An escaped UTF-16 surrogate: Python's json and pydantic's parser treat lone ones apart.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _NotExact(ValueError):
    pass


def _refuse(_: object) -> Any:
    raise _NotExact


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: pydantic's parser and Python's may differ
        raise _NotExact
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # a name written twice
        raise _NotExact
    return value


def exact_bundle_json(data: bytes) -> BundleJson | None:
    """bundle.json as gapkit writes it, as plain values: what `BundleManifest.model_validate_json
    (data).model_dump()` returns for it. None when `data` is anything else; the models decide."""
    try:
        text = data.decode("utf-8")
        if _SURROGATE_ESCAPE.search(text):
            return None
        value = json.loads(text, object_pairs_hook=_unique, parse_float=_finite,
                           parse_constant=_refuse)
    except (ValueError, RecursionError):  # _NotExact, UnicodeDecodeError, JSONDecodeError
        return None
    return cast(BundleJson, value) if _is_bundle_json(value) else None
