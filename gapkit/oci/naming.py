"""How images are named inside OCI layouts and archives (one rule for every local store).

gapkit writes the full reference (`docker.io/library/nginx:latest`) in both
`io.containerd.image.name` (what `ctr image import` reads) and
`org.opencontainers.image.ref.name` (what skopeo's `oci:DIR:NAME` reads). When reading, an
entry matches a reference if either annotation, parsed with `Reference.parse`, names the same
tag, so skopeo-style short names (`ref.name: v1`) and Docker 25's (`ref.name: latest` beside a
full containerd name) are found too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from gapkit.errors import InvalidReference
from gapkit.oci.model import ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME
from gapkit.oci.reference import Reference


def entry_names(annotations: Mapping[str, str] | object) -> list[Reference]:
    """The references an index entry answers to; the first is the one to list it under."""
    names: list[Reference] = []
    if not isinstance(annotations, Mapping):
        return names
    for key in (ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME):
        text = annotations.get(key)
        if not text:
            continue
        ref = _parse_name(str(text))
        if ref is not None and ref.digest is None and ref not in names:
            names.append(ref)
    return names


@functools.lru_cache(maxsize=1 << 16)
def _parse_name(text: str) -> Reference | None:
    """Names are looked up again and again (each entry, each lookup): parse each one once."""
    try:
        return Reference.parse(text)
    except InvalidReference:
        return None


def same_name(a: Reference, b: Reference) -> bool:
    """Whether two references name the same tag (digests aside)."""
    return a.repository == b.repository and a.tag == b.tag


def naming_annotations(ref: Reference) -> dict[str, str]:
    """The annotations that name `ref` in an index.json entry."""
    name = str(ref.with_digest(None)) if ref.tag else str(ref)
    return {ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: name}
