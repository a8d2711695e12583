"""Channels, snap names and architectures, checked as snapd checks them (no stand-ins)."""

from __future__ import annotations

import pytest

from gapkit.errors import UsageError
from gapkit.snaps import Channel, check_snap_name, parse_channel, snap_architecture


@pytest.mark.parametrize(("given", "full"), [
    ("1.32/stable", "1.32/stable"),
    ("1.32", "1.32/stable"),
    ("1.27", "1.27/stable"),
    ("latest/edge", "latest/edge"),
    ("edge", "latest/edge"),
    ("stable", "latest/stable"),
    ("1.32-strict/stable", "1.32-strict/stable"),
    ("1.32-strict", "1.32-strict/stable"),
    ("1.25-eksd/candidate", "1.25-eksd/candidate"),
    ("1.32/beta/hotfix-1", "1.32/beta/hotfix-1"),
    ("edge/fix-123", "latest/edge/fix-123"),
])
def test_channels_parse_to_their_full_form(given: str, full: str) -> None:
    assert str(parse_channel(given)) == full


def test_channel_parts() -> None:
    assert parse_channel("1.32/candidate/x") == Channel("1.32", "candidate", "x")


@pytest.mark.parametrize("bad", [
    "", "/stable", "1.32/", "1.32/stabel", "1.32/stable/", "a/b/c/d", "1.32 /stable",
    "1.32/stable/hot fix", "-1.32/stable", "1.32/stable\n",
])
def test_a_bad_channel_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_channel(bad)
    assert repr(bad) in caught.value.message
    assert "1.32/stable" in (caught.value.hint or "")
    assert caught.value.exit_code == 2


def test_snap_names() -> None:
    for good in ("microk8s", "core20", "core18", "snapd", "core", "k8s-dqlite"):
        assert check_snap_name(good) == good
    for bad in ("", "c", "Core20", "core_20", "core20.snap", "-core", "core--20", "../x", "1234"):
        with pytest.raises(UsageError):
            check_snap_name(bad, "base snap")


@pytest.mark.parametrize(("platform", "arch"), [
    ("linux/amd64", "amd64"), ("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64"),
    ("linux/arm/v7", "armhf"), ("linux/ppc64le", "ppc64el"), ("linux/s390x", "s390x"),
    ("linux/riscv64", "riscv64"), ("arm64", "arm64"), ("ppc64el", "ppc64el"),
])
def test_oci_platforms_map_to_snap_architectures(platform: str, arch: str) -> None:
    assert snap_architecture(platform) == arch


def test_an_unknown_platform_is_a_usage_error() -> None:
    for bad in ("windows/amd64", "linux/mips64le", "x86_64"):
        with pytest.raises(UsageError):
            snap_architecture(bad)
