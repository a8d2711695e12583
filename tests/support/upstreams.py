"""Stand-ins for docker.io, registry.k8s.io, quay.io…: one real docker-registry per upstream.

Tests reach them the way an operator reaches a pull-through cache: `--mirror UPSTREAM=URL`.
Each holds synthetic images under the real MicroK8s image names, so catalog-driven bundles can
be built without the internet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.oci.reference import Reference
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.peers import Registry

#: Images named here become amd64 + arm64 indexes, as coredns and pause are upstream.
MULTI_ARCH = ("coredns", "pause")


@dataclass
class Upstreams:
    folder: Path
    registries: dict[str, Registry] = field(default_factory=dict)
    #: reference -> digest of what was pushed
    pushed: dict[str, str] = field(default_factory=dict)

    def registry_for(self, upstream: str) -> Registry:
        if upstream not in self.registries:
            self.registries[upstream] = Registry(self.folder / upstream).start()
        return self.registries[upstream]

    def push(self, references: Iterable[str], layer_size: int = 20_000) -> dict[str, str]:
        """Push a small synthetic image (multi-arch for coredns/pause) under each reference."""
        base = make_layer(7, layer_size)
        layout = self.folder / "layout"
        specs = []
        for i, text in enumerate(sorted(set(references))):
            ref = Reference.parse(text)
            own = make_layer(1000 + i, layer_size // 4 + i)
            others = ({"linux/arm64/v8": [make_layer(5000 + i, 500 + i)]}
                      if any(m in ref.path for m in MULTI_ARCH) else {})
            specs.append(ImageSpec(str(ref), [base, own], others=others))
        digests = write_layout(layout, specs)
        for spec in specs:
            ref = Reference.parse(spec.name)
            self.registry_for(ref.registry).push_layout(layout, spec.name, f"{ref.path}:{ref.tag}")
            self.pushed[spec.name] = digests[spec.name]
        return digests

    def mirror_flags(self) -> list[str]:
        return [f"--mirror={up}=http://{reg.host}" for up, reg in self.registries.items()]

    def source_flags(self) -> list[str]:
        """`--mirror` and `--plain-http` flags that reach every stand-in, for gapkit commands."""
        flags = self.mirror_flags()
        for registry in self.registries.values():
            flags += ["--plain-http", registry.host]
        return flags

    def build_bundle(self, path: Path, images: Iterable[str] = (),
                     platforms: Iterable[str] = ("linux/amd64",), *,
                     microk8s: str | None = None, snaps_from: Path | None = None,
                     extra: Iterable[str] = ()) -> Path:
        """`gapkit bundle create` into `path` from these stand-ins (push the images first).

        Without `microk8s`, an images-only bundle (`--no-snaps`) of `images`; with it, that
        release's images plus `images`, and its snaps from `snaps_from`.
        """
        from tests.support.cli import gapkit

        release = (["--microk8s", microk8s, "--snaps-from", str(snaps_from)] if microk8s
                   else ["--no-snaps"])
        gapkit("bundle", "create", *release, *[f"--image={i}" for i in images],
               *[f"--platform={p}" for p in platforms], "--cache", str(self.folder / "cache"),
               "-o", str(path), *extra, *self.source_flags())
        return path

    def mirrors(self) -> dict[str, list[str]]:
        return {up: [f"http://{reg.host}"] for up, reg in self.registries.items()}

    def stop(self) -> None:
        for registry in self.registries.values():
            registry.stop()
