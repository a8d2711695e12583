from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gapkit.errors import InvalidReference
from gapkit.oci.model import Digest
from gapkit.oci.reference import Reference, Repository

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("calico/cni:v3.25.0", "docker.io/calico/cni:v3.25.0"),
        ("docker.io/nginx", "docker.io/library/nginx:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
        (f"host.io/a/b:tag@{DIGEST}", f"host.io/a/b:tag@{DIGEST}"),
        (f"quay.io/metallb/speaker@{DIGEST}", f"quay.io/metallb/speaker@{DIGEST}"),
        ("[::1]:5000/foo:bar", "[::1]:5000/foo:bar"),
        ("a__b/c-d.e_f:x", "docker.io/a__b/c-d.e_f:x"),
    ],
)
def test_normalises_like_docker(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


def test_digest_only_reference_has_no_tag() -> None:
    ref = Reference.parse(f"quay.io/metallb/speaker@{DIGEST}")
    assert ref.tag is None
    assert ref.digest == Digest.parse(DIGEST)
    assert ref.identifier == DIGEST


def test_familiar_form_drops_docker_hub_and_library() -> None:
    assert Reference.parse("docker.io/library/nginx:1").familiar() == "nginx:1"
    assert Reference.parse("calico/cni:v3").familiar() == "calico/cni:v3"
    assert Reference.parse("registry.k8s.io/pause:3.10").familiar() == "registry.k8s.io/pause:3.10"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Nginx", "lower case"),
        ("docker.io/Calico/cni", "lower case"),
        ("nginx:", "tag is empty"),
        ("nginx:-bad", "tag"),
        ("nginx@sha256:abc", "64 lower-case hex"),
        (f"nginx@md5:{'a' * 32}", "not sha256"),
        ("nginx@" + DIGEST.upper().replace("SHA256", "sha256"), "lower-case hex"),
        ("a/../b", "'..'"),
        ("a//b", "empty"),
        ("", "empty"),
        (" nginx", "padded"),
        ("-bad.host:5000/x", "registry host"),
        ("x/" + "a" * 300, "longer than 255"),
        ("nginx:" + "t" * 129, "tag"),
    ],
)
def test_rejects_invalid_references_saying_why(text: str, why: str) -> None:
    with pytest.raises(InvalidReference) as err:
        Reference.parse(text)
    assert why in err.value.message
    assert repr(text) in err.value.message or text == ""


def test_repository_refuses_tags_and_digests() -> None:
    assert Repository.parse("quay.io/metallb/speaker") == Repository("quay.io", "metallb/speaker")
    with pytest.raises(InvalidReference):
        Repository.parse("nginx:1")


_component = st.from_regex(r"[a-z0-9]{1,5}([._-][a-z0-9]{1,5}){0,2}", fullmatch=True)
_host = st.sampled_from(["docker.io", "registry.k8s.io", "quay.io", "localhost",
                         "localhost:5000", "127.0.0.1:32000", "my-registry.example.com:443"])
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@given(_host, st.lists(_component, min_size=1, max_size=4), st.none() | _tag, st.none() | _digest)
def test_parse_format_round_trip(host: str, path: list[str], tag: str | None,
                                 digest: str | None) -> None:
    if host == "docker.io" and len(path) == 1:
        path = ["library", *path]
    text = f"{host}/{'/'.join(path)}"
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    ref = Reference.parse(text)
    expected = text if (tag or digest) else text + ":latest"
    assert str(ref) == expected
    assert Reference.parse(str(ref)) == ref
    assert Reference.parse(ref.familiar()) == ref


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_invalid_reference(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReference as exc:
        assert exc.message
    else:
        assert Reference.parse(str(ref)) == ref
