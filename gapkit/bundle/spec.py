"""What a bundle holds: the spec (`gapkit.yaml`, or the same as `bundle create` flags).

```yaml
microk8s: "1.32"              # release; omit for an images-only bundle
channel: 1.32/stable          # default: <release>/stable
addons: [dns, ingress]
images: [nginx:1.27]
images_from: [images.txt]     # one reference per line
manifests: [k8s/]             # Kubernetes YAML and Helm charts to scan for images
platforms: [linux/amd64]      # default: this host's
snaps: {enabled: true, from: ./snaps, snapd: true}
registries:                   # how to reach the source registries (as `gapkit copy` flags)
  mirrors: {docker.io: [http://10.0.0.5:5000]}
  plain_http: [10.0.0.5:5000]
  insecure: []
  ca: {registry.example:5000: ./ca.crt}
  creds: {registry.example:5000: "user:${REGISTRY_PASSWORD}"}
```
Relative paths are relative to the spec file; `${VAR}` in credentials comes from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gapkit.errors import GapkitError, UsageError
from gapkit.oci.model import Platform
from gapkit.oci.reference import Reference
from gapkit.oci.stores.options import DEFAULT_RETRIES, DEFAULT_TIMEOUT
from gapkit.oci.transports import RegistrySettings, registry_settings_from_flags
from gapkit.yamlfile import load_model

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _base(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base", "."))


def _resolve(path: Path, info: ValidationInfo) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else _base(info) / path


def _check(value: str, parse: Any) -> str:
    try:
        parse(value)
    except GapkitError as exc:
        raise ValueError(exc.message) from None
    return value


ImageText = Annotated[str, AfterValidator(lambda v: _check(v, Reference.parse))]
PlatformText = Annotated[str, AfterValidator(lambda v: _check(v, Platform.parse))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SnapsSpec(_Strict):
    enabled: bool = True
    #: A folder holding the snaps and their assertions, instead of `snap download`.
    from_: Path | None = Field(default=None, alias="from")
    #: Also carry the snapd snap (core20/core22 may need a newer snapd than the node has).
    snapd: bool = True

    @field_validator("from_")
    @classmethod
    def _relative_to_spec(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info) if value is not None else None


class SourceRegistries(_Strict):
    mirrors: dict[str, list[str]] = Field(default_factory=dict)
    plain_http: list[str] = Field(default_factory=list)
    insecure: list[str] = Field(default_factory=list)
    ca: dict[str, Path] = Field(default_factory=dict)
    creds: dict[str, str] = Field(default_factory=dict)
    #: Retries of one request before the build fails (as skopeo's --retry-times).
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=100)
    #: Seconds to connect and the longest silence tolerated while reading.
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)

    @field_validator("ca")
    @classmethod
    def _ca_relative(cls, value: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        return {host: _resolve(path, info) for host, path in value.items()}

    @field_validator("creds")
    @classmethod
    def _expand_env(cls, value: dict[str, str]) -> dict[str, str]:
        def expand(match: re.Match[str]) -> str:
            name = match[1]
            if name not in os.environ:
                raise ValueError(f"the environment variable {name} is not set")
            return os.environ[name]
        return {host: _ENV.sub(expand, secret) for host, secret in value.items()}

    def settings(self) -> RegistrySettings:
        return registry_settings_from_flags(
            plain_http=self.plain_http,
            ca=[f"{host}={path}" for host, path in self.ca.items()],
            creds=[f"{host}={secret}" for host, secret in self.creds.items()],
            mirrors=[f"{up}={url}" for up, urls in self.mirrors.items() for url in urls],
            insecure=self.insecure,
            retries=self.retries,
            timeout=self.timeout,
        )


class BundleSpec(_Strict):
    microk8s: str | None = None
    channel: str | None = None
    addons: list[str] = Field(default_factory=list)
    images: list[ImageText] = Field(default_factory=list)
    images_from: list[Path] = Field(default_factory=list)
    manifests: list[Path] = Field(default_factory=list)
    platforms: list[PlatformText] = Field(default_factory=list)
    snaps: SnapsSpec = Field(default_factory=SnapsSpec)
    registries: SourceRegistries = Field(default_factory=SourceRegistries)

    @field_validator("microk8s", "channel", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # YAML reads `microk8s: 1.30` as the float 1.3; take numbers as the text written.
        if isinstance(value, float):
            raise ValueError("write the release in quotes (\"1.30\"): YAML reads 1.30 as 1.3")
        return str(value) if isinstance(value, int) else value

    @field_validator("images_from", "manifests")
    @classmethod
    def _paths_relative(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return [_resolve(p, info) for p in value]

    def platform_set(self) -> list[Platform]:
        return [Platform.parse(p) for p in self.platforms] or [Platform.host()]

    def merged(self, other: BundleSpec) -> BundleSpec:
        """This spec with `other` (from flags) on top: lists add up, set values win."""
        data = self.model_dump(by_alias=True)
        for key, value in other.model_dump(by_alias=True, exclude_unset=True).items():
            if isinstance(value, list):
                data[key] = [*data.get(key, []), *(v for v in value if v not in data.get(key, []))]
            elif isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return BundleSpec.model_validate(data)

    def check(self) -> None:
        if not self.microk8s and not (self.images or self.images_from or self.manifests):
            raise UsageError(
                "the bundle would be empty: name a MicroK8s release or some images",
                hint="pass --microk8s 1.32, --image REF, --images-from FILE or --manifests DIR "
                "(or the same keys in -f gapkit.yaml)",
            )
        if self.channel and not self.microk8s:
            raise UsageError("--channel needs --microk8s (the release whose snap to carry)")
        if self.snaps.enabled and not self.microk8s and self.snaps.from_ is not None:
            raise UsageError("--snaps-from needs --microk8s (the release whose snaps to carry)")


def load_spec(path: Path | None, overrides: dict[str, Any]) -> BundleSpec:
    """The spec from file `path` (if any) with the flags in `overrides` on top.

    `overrides` holds only the flags that were given, with the spec's key names
    (`microk8s`, `images`, `snaps: {enabled: False}`, `registries: {...}`, ...).
    """
    base = load_model(path, BundleSpec) if path is not None else BundleSpec()
    if not overrides:
        return base
    try:
        flags = BundleSpec.model_validate(overrides, context={"base": Path.cwd()})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"--{where.replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}") \
            from None
    return base.merged(flags)


def bundle_flags(
    microk8s: str | None = None,
    channel: str | None = None,
    addons: str | None = None,
    images: Sequence[str] = (),
    images_from: Sequence[Path] = (),
    manifests: Sequence[Path] = (),
    platforms: Sequence[str] = (),
    no_snaps: bool = False,
    snaps_from: Path | None = None,
    no_snapd: bool = False,
    plain_http: Sequence[str] = (),
    ca: Sequence[str] = (),
    creds: Sequence[str] = (),
    mirrors: Sequence[str] = (),
    insecure: Sequence[str] = (),
    retries: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The `bundle create` flags that were given, as spec keys (see `load_spec`)."""
    out: dict[str, Any] = {}
    for key, value in (("microk8s", microk8s), ("channel", channel)):
        if value is not None:
            out[key] = value
    if addons:
        out["addons"] = [a.strip() for a in addons.split(",") if a.strip()]
    for key, values in (("images", images), ("images_from", images_from),
                        ("manifests", manifests), ("platforms", platforms)):
        if values:
            out[key] = list(values)
    snaps: dict[str, Any] = {}
    if no_snaps:
        snaps["enabled"] = False
    if snaps_from is not None:
        snaps["from"] = snaps_from
    if no_snapd:
        snaps["snapd"] = False
    if snaps:
        out["snaps"] = snaps
    registries: dict[str, Any] = {}
    if plain_http:
        registries["plain_http"] = list(plain_http)
    if insecure:
        registries["insecure"] = list(insecure)
    if retries is not None:
        registries["retries"] = retries
    if timeout is not None:
        registries["timeout"] = timeout
    for key, items in (("ca", ca), ("creds", creds)):
        pairs = {}
        for item in items:
            host, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--{key} {item!r}: write --{key} REGISTRY=VALUE")
            pairs[host] = value
        if pairs:
            registries[key] = pairs
    mirror_map: dict[str, list[str]] = {}
    for item in mirrors:
        upstream, sep, url = item.partition("=")
        if not sep:
            raise UsageError(f"--mirror {item!r}: write --mirror UPSTREAM=URL")
        mirror_map.setdefault(upstream, []).append(url)
    if mirror_map:
        registries["mirrors"] = mirror_map
    if registries:
        out["registries"] = registries
    return out
