"""Which images a MicroK8s cluster and its workloads need.

- `release("1.32")`, `releases()`, `channel("1.32-strict/stable")`: MicroK8s releases with their
  core images, addon images, snap base and confinement (see `releases.py` for how each is built).
- `discover(paths)`: images in Kubernetes manifests and Helm charts.
- `resolve_images(...)`: everything together, normalised and de-duplicated, each image with its
  sources; what `gapkit images list` prints and `gapkit bundle create` fetches.
"""

from __future__ import annotations

from gapkit.catalog.discovery import Discovery, FoundImage, Problem, discover
from gapkit.catalog.releases import (
    CatalogImage,
    Channel,
    ImagesTxtDiff,
    Release,
    UnknownAddon,
    UnknownRelease,
    addon_names,
    channel,
    known_release_names,
    release,
    releases,
)
from gapkit.catalog.resolve import ImageList, ImageListError, ResolvedImage, read_images_file, resolve_images

__all__ = [
    "CatalogImage",
    "Channel",
    "Discovery",
    "FoundImage",
    "ImageList",
    "ImageListError",
    "ImagesTxtDiff",
    "Problem",
    "Release",
    "ResolvedImage",
    "UnknownAddon",
    "UnknownRelease",
    "addon_names",
    "channel",
    "discover",
    "known_release_names",
    "read_images_file",
    "release",
    "releases",
    "resolve_images",
]
