"""containerd `hosts.toml` files: one per upstream registry, pointing at a mirror.

containerd 1.5+ (MicroK8s' runtime) reads `<config_path>/<upstream>/hosts.toml` for every pull,
without a restart. The mistakes users make by hand, and that this module cannot make:

- an HTTP mirror written without `http://` (containerd then speaks HTTPS to it);
- a mirror for docker.io only, while the pause image comes from registry.k8s.io: callers pass
  every upstream the images come from;
- a mirror whose images live under a path (`HOST/docker.io/...`) without `override_path = true`
  (and without `/v2` in the host URL, which `override_path` needs);
- a `server` line that makes containerd fall back to the internet when the mirror fails; kept by
  default, since the mirror may lack an image, but `fallback=False` points it at the mirror.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.oci.fsutil import atomic_write
from gapkit.oci.reference import DOCKER_HUB

#: What containerd calls the upstream's own endpoint (`server`) for each upstream.
_SERVER = {DOCKER_HUB: "https://registry-1.docker.io"}


@dataclass(frozen=True)
class Mirror:
    """One mirror host entry: a URL (`http://10.0.0.5:5000`, or with a path) and how to reach it."""

    url: str
    #: Path of the CA certificate *on the node* (`ca.crt` beside hosts.toml), for HTTPS.
    ca: str | None = None
    skip_verify: bool = False
    #: The URL already ends in the API path (`…/v2/docker.io`): send requests to it as is.
    override_path: bool = False
    credentials: tuple[str, str] | None = None
    capabilities: tuple[str, ...] = ("pull", "resolve")
    headers: dict[str, str] = field(default_factory=dict)


def upstream_server(upstream: str) -> str:
    return _SERVER.get(upstream, f"https://{upstream}")


def directory_name(upstream: str) -> str:
    """The folder under `config_path` for `upstream` (`docker.io`, `registry.example:5000`)."""
    return upstream


def _quote(text: str) -> str:
    return json.dumps(text)


def render(upstream: str, mirrors: Iterable[Mirror], fallback: bool = True) -> str:
    """The text of `<upstream>/hosts.toml`: mirrors tried in order, then the upstream.

    With `fallback=False`, `server` names the first mirror, so a failing mirror never sends
    containerd to the internet (an air-gapped node would only wait for timeouts there).
    """
    mirrors = list(mirrors)
    server = upstream_server(upstream) if fallback or not mirrors else mirrors[0].url
    lines = [
        "# Written by gapkit: pull " + upstream + " images through the mirror(s) below"
        + (", then the upstream." if fallback else "; never the upstream."),
        f"server = {_quote(server)}",
    ]
    if not fallback and mirrors:
        # `server` is the mirror itself: it needs the mirror's own TLS and path settings.
        lines += _settings(mirrors[0], indent="")
    lines.append("")
    for mirror in mirrors:
        key = f"host.{_quote(mirror.url)}"
        lines.append(f"[{key}]")
        lines.append("  capabilities = [" + ", ".join(_quote(c) for c in mirror.capabilities) + "]")
        lines += _settings(mirror, indent="  ")
        headers = dict(mirror.headers)
        if mirror.credentials is not None:
            token = base64.b64encode(":".join(mirror.credentials).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if headers:
            lines.append(f"  [{key}.header]")
            lines += [f"    {_quote(name)} = [{_quote(value)}]" for name, value in headers.items()]
        lines.append("")
    return "\n".join(lines)


def _settings(mirror: Mirror, indent: str) -> list[str]:
    lines = []
    if mirror.ca:
        lines.append(f"{indent}ca = {_quote(mirror.ca)}")
    if mirror.skip_verify:
        lines.append(f"{indent}skip_verify = true")
    if mirror.override_path:
        lines.append(f"{indent}override_path = true")
    return lines


def write_hosts_dir(folder: Path, files: dict[str, str], ca_file: Path | None = None) -> list[Path]:
    """Write `<folder>/<upstream>/hosts.toml` (and `ca.crt` beside it) for each upstream."""
    written = []
    for upstream, text in files.items():
        target = folder / directory_name(upstream)
        target.mkdir(parents=True, exist_ok=True)
        if ca_file is not None:
            atomic_write(target / "ca.crt", ca_file.read_bytes())
        atomic_write(target / "hosts.toml", text.encode())
        written.append(target / "hosts.toml")
    return written
