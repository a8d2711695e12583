"""What MicroK8s addons do besides running images: which addons they enable, and caveats offline.

Facts from canonical/microk8s-core-addons `addons/<name>/enable` (see
../shared/data/microk8s/README.md §7): `registry` enables `hostpath-storage` (unless
`--storageclass` is given), `dashboard` enables `metrics-server`, `cert-manager` enables `dns`,
`observability` enables `dns` and `hostpath-storage`. `helm`/`helm3` deploy no images (the binary
is in the snap). Addons installed from a Helm chart repository need that repository at enable
time, which an air-gapped cluster does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Addons each addon enables when it is enabled (their images are needed too).
REQUIRES: dict[str, tuple[str, ...]] = {
    "registry": ("hostpath-storage",),
    "dashboard": ("metrics-server",),
    "cert-manager": ("dns",),
    "observability": ("dns", "hostpath-storage"),
}

#: Addons that exist in every release and deploy no image.
IMAGELESS = ("helm", "helm3")

#: Other names MicroK8s accepts for an addon (`storage` is the deprecated name).
ALIASES: dict[str, str] = {"storage": "hostpath-storage"}


@dataclass(frozen=True)
class AddonNote:
    """A caveat about an addon in the releases from `since` (inclusive) to `until` (inclusive)."""

    addon: str
    text: str
    since: tuple[int, int] = (0, 0)
    until: tuple[int, int] = (99, 99)

    def applies(self, addon: str, version: tuple[int, int]) -> bool:
        return addon == self.addon and self.since <= version <= self.until


NOTES: tuple[AddonNote, ...] = (
    AddonNote(
        "ingress",
        "ingress installs Traefik from the Helm chart repository https://traefik.github.io/charts and "
        "applies the Gateway API CRDs from github.com when it is enabled; both need network, so serve the "
        "chart from a local repository and apply the CRDs from a local copy",
        since=(1, 35),
    ),
    AddonNote(
        "dashboard",
        "dashboard is installed from a Helm chart repository when it is enabled "
        "(needs network, or a local repository: microk8s enable dashboard -r URL)",
        since=(1, 33),
    ),
    AddonNote(
        "cert-manager",
        "cert-manager is installed from the Helm chart repository https://charts.jetstack.io when it "
        "is enabled (needs network, or a local chart repository)",
        since=(1, 33),
    ),
    AddonNote(
        "observability",
        "observability installs kube-prometheus-stack, loki-stack and tempo from the "
        "prometheus-community and grafana Helm chart repositories when it is enabled (needs network, "
        "or local chart repositories)",
    ),
    AddonNote("dashboard", "dashboard is deprecated in MicroK8s 1.35 and removed after it",
              since=(1, 35), until=(1, 35)),
)


def canonical_name(name: str) -> str:
    """`core/dns` → `dns`, `dns:10.0.0.53` → `dns` (enable arguments are not the catalog's business),
    `storage` → `hostpath-storage`."""
    name = name.strip().lower()
    name = name.split(":", 1)[0]
    if name.startswith("core/"):
        name = name[len("core/"):]
    return ALIASES.get(name, name)
