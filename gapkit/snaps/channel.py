"""Snap channels, snap names and snap architectures, checked as snapd checks them.

A channel is `[<track>/]<risk>[/<branch>]`, or a track alone (`1.32` means `1.32/stable`, as
`snap download --channel 1.32` takes it); risks are `stable`, `candidate`, `beta`, `edge`.
MicroK8s publishes tracks such as `1.32`, `1.32-strict`, `1.25-eksd` and `latest`.
"""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass

from gapkit.errors import UsageError

RISKS = ("stable", "candidate", "beta", "edge")
DEFAULT_TRACK = "latest"

_TRACK = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]{0,62}[a-zA-Z0-9])?")
_BRANCH = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]{0,126}[a-zA-Z0-9])?")
# snapd's naming.ValidateSnap: lower case letters, digits and single hyphens, one letter at least
_SNAP_NAME = re.compile(r"(?:[a-z0-9]+-?)*[a-z](?:-?[a-z0-9])*")

#: snap architectures by OCI platform architecture (and variant, for 32-bit ARM).
_SNAP_ARCH_BY_OCI = {
    "amd64": "amd64", "arm64": "arm64", "arm": "armhf", "arm/v7": "armhf", "arm/v6": "armhf",
    "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64", "386": "i386",
}
#: snap architectures by `uname -m`.
_SNAP_ARCH_BY_MACHINE = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "armhf",
    "armv6l": "armhf", "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64",
    "i686": "i386", "i386": "i386",
}
SNAP_ARCHITECTURES = frozenset(_SNAP_ARCH_BY_OCI.values())


@dataclass(frozen=True)
class Channel:
    """A parsed snap channel; `str()` gives the full `track/risk[/branch]` form."""

    track: str
    risk: str
    branch: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.branch}" if self.branch else ""
        return f"{self.track}/{self.risk}{tail}"


def parse_channel(text: str) -> Channel:
    """Parse a channel as snapd does; a bad one is a `UsageError` that shows the forms."""
    parts = text.split("/")
    track: str | None = None
    branch: str | None = None
    if len(parts) == 1:
        if parts[0] in RISKS:
            risk = parts[0]
        else:
            track, risk = parts[0], "stable"
    elif len(parts) == 2:
        if parts[0] in RISKS:
            risk, branch = parts
        else:
            track, risk = parts
    elif len(parts) == 3:
        track, risk, branch = parts
    else:
        raise _bad_channel(text, "too many '/'")
    if track is not None and not _TRACK.fullmatch(track):
        raise _bad_channel(text, f"{track!r} is not a valid track")
    if risk not in RISKS:
        raise _bad_channel(text, f"{risk!r} is not a risk ({', '.join(RISKS)})")
    if branch is not None and not _BRANCH.fullmatch(branch):
        raise _bad_channel(text, f"{branch!r} is not a valid branch")
    return Channel(track or DEFAULT_TRACK, risk, branch)


def _bad_channel(text: str, why: str) -> UsageError:
    return UsageError(
        f"invalid snap channel {text!r}: {why}",
        hint="a channel is [<track>/]<risk>[/<branch>], e.g. 1.32/stable, 1.32, "
             "1.32-strict/stable, latest/edge")


def check_snap_name(name: str, what: str = "snap name") -> str:
    """Return `name` if it is a valid snap name, else raise `UsageError`."""
    if not (2 <= len(name) <= 40 and _SNAP_NAME.fullmatch(name)):
        raise UsageError(f"invalid {what} {name!r}",
                         hint="snap names are 2 to 40 lower case letters, digits and hyphens, "
                              "e.g. microk8s, core20, snapd")
    return name


def snap_architecture(platform: str) -> str:
    """The snap architecture for an OCI platform: `linux/arm64` → `arm64`, `linux/arm/v7` → `armhf`.

    A bare snap architecture (`amd64`, `ppc64el`, …) is returned as it is.
    """
    if platform in SNAP_ARCHITECTURES:
        return platform
    parts = platform.split("/")
    if len(parts) >= 2 and parts[0] == "linux":
        for arch in ("/".join(parts[1:3]), parts[1]):  # `arm/v7`, then `arm64` of `arm64/v8`
            if arch in _SNAP_ARCH_BY_OCI:
                return _SNAP_ARCH_BY_OCI[arch]
    raise UsageError(f"no snap architecture for platform {platform!r}",
                     hint="snaps exist for linux/amd64, linux/arm64, linux/arm/v7 (armhf), "
                          "linux/ppc64le, linux/s390x, linux/riscv64")


def host_architecture() -> str | None:
    """The snap architecture of this machine, as `snap download` picks it by default."""
    return _SNAP_ARCH_BY_MACHINE.get(_platform.machine().lower())
