"""MicroK8s releases as values: the images a node needs at start, the images of each addon, the snap base.

The data files in `data/` are byte-for-byte copies of ../shared/data/microk8s (its README says
where each line comes from):

- `core-by-branch.tsv`: calico (from `calico.yaml`), pause (the containerd template's
  `sandbox_image`) and coredns (core-addons `coredns.yaml`) per branch, worked out from source;
- `addon-images-by-version.tsv`: the images of each addon per core-addons branch, 1.28 to 1.35 and
  `main`;
- `snap-bases.txt`: snap base and confinement per branch and tag;
- `images/<ref>.txt`: upstream's `build-scripts/images.txt`, which is stale on some branches. It is
  only a fallback (eksd branches, addons before 1.28) and a cross-check.

How a release is put together:

- **classic** `1.N`: core from `core-by-branch.tsv` row `1.N`; coredns counts as core from 1.27,
  when `microk8s.default.yaml` started enabling dns at install, and is the `dns` addon before.
  Addons from the core-addons table for `1.N` when it has that branch (1.28 and later); before
  that, dns, hostpath-storage, ingress and metrics-server come from the release's images.txt (the
  only addons it lists), matched by image name, and their sources say so.
- **strict** `1.N-strict`: the same calico.yaml, containerd template and core-addons branch as
  `1.N` (the strict images.txt agree, except 1.30-strict, whose file lost calico/kube-controllers
  in a bad generation run); base and confinement from its own snapcraft.yaml row.
- **eksd** `1.N-eksd`: no source-derived data exists, so everything comes from its images.txt.
- **the newest** (1.36): there is no 1.36 branch in the data, only tag `v1.36`, which was cut from
  master. It is built from `master` (core) and core-addons `main`; its base is the tag's. The tag's
  images.txt agrees on calico and pause; for coredns, metrics-server and traefik it names older
  tags than core-addons main, and which of the two a 1.36 snap runs depends on when it was built,
  so both are carried (rule below). `master` and `latest` name it.

Upstream refreshes images.txt daily for master, 1.27-1.32 and their strict twins by installing the
published snap, so on those branches images.txt tells which tags the published snap runs. Where it
names another tag of an addon image (or coredns) than the source data (1.32-strict's ingress, 1.36's
coredns, metrics-server and traefik), both tags are carried: a missing image breaks an air-gapped
node, an extra one costs some megabytes. Sources of such images end in "from images.txt".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from gapkit.catalog import addons as addon_facts
from gapkit.errors import UsageError
from gapkit.oci.reference import Reference

if TYPE_CHECKING:
    from importlib.abc import Traversable

Flavour = Literal["classic", "strict", "eksd"]
Group = Literal["core", "addon"]

#: The oldest release the catalog covers (the oldest branch with an images.txt).
MIN_VERSION = (1, 22)
#: dns is enabled at install from this release on (microk8s.default.yaml).
DNS_AT_INSTALL = (1, 27)
#: Branches whose images.txt upstream refreshes daily from the published snap (and master).
REFRESHED = ((1, 27), (1, 32))
#: Snap channel risks.
RISKS = ("stable", "candidate", "beta", "edge")
#: Names of the newest release.
NEWEST_ALIASES = ("master", "latest")

_FLAVOURS: tuple[Flavour, ...] = ("classic", "strict", "eksd")
_TRACK_RE = re.compile(r"^v?(?P<version>[0-9]+\.[0-9]+)(?:\.[0-9]+)?(?:-(?P<flavour>strict|eksd))?$")
_CORE_ORIGIN = {
    "calico": "canonical/microk8s {ref}: upgrade-scripts/000-switch-to-calico/resources/calico.yaml",
    "pause": "canonical/microk8s {ref}: microk8s-resources/default-args/containerd-template.toml "
             "sandbox_image",
    "coredns": "canonical/microk8s-core-addons {ref}: addons/dns/coredns.yaml",
}
_UNVERIFIED_MARKERS = ("INFERRED", "NOT verified", "third-party")


class UnknownRelease(UsageError):
    """A MicroK8s release or channel the catalog does not know."""


class UnknownAddon(UsageError):
    """An addon the catalog does not know, or has no image data for in this release."""


@dataclass(frozen=True)
class CatalogImage:
    """One image of a release: core (`calico`, `pause`, `coredns`) or of an addon."""

    reference: Reference
    group: Group
    name: str
    release: str
    origin: str = field(default="", compare=False)
    from_images_txt: bool = False

    def describe(self, enabled_by: str | None = None) -> str:
        """`core:calico (microk8s 1.32)`, `addon:hostpath-storage (microk8s 1.32, enabled by registry)`."""
        extra = ""
        if enabled_by:
            extra += f", enabled by {enabled_by}"
        if self.from_images_txt:
            extra += ", from images.txt"
        return f"{self.group}:{self.name} (microk8s {self.release}{extra})"

    @property
    def source(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class ImagesTxtDiff:
    """How upstream's images.txt differs from the catalog for the images it covers."""

    only_in_images_txt: tuple[Reference, ...]
    only_in_catalog: tuple[Reference, ...]

    def __bool__(self) -> bool:
        return bool(self.only_in_images_txt or self.only_in_catalog)


@dataclass(frozen=True)
class Release:
    """One MicroK8s release: `1.32`, `1.32-strict`, `1.24-eksd`."""

    version: str
    flavour: Flavour
    snap_base: str
    confinement: str
    notes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    _core: tuple[CatalogImage, ...] = field(default=(), repr=False)
    _addons: tuple[tuple[str, tuple[CatalogImage, ...]], ...] = field(default=(), repr=False)
    _addon_notes: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    _images_txt: tuple[Reference, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return self.version if self.flavour == "classic" else f"{self.version}-{self.flavour}"

    @property
    def track(self) -> str:
        """The snap track: `1.32`, `1.32-strict`."""
        return self.name

    @property
    def version_tuple(self) -> tuple[int, int]:
        return _version_tuple(self.version)

    def channel(self, risk: str = "stable") -> str:
        """The snap channel, `1.32-strict/stable`."""
        return f"{self.track}/{risk}"

    def core_images(self) -> tuple[CatalogImage, ...]:
        """What a node pulls before any addon: calico, pause, and coredns from 1.27."""
        return self._core

    def addons(self) -> tuple[str, ...]:
        """Addons the catalog knows for this release (sorted; `helm`/`helm3` have no images)."""
        return tuple(sorted({name for name, _ in self._addons} | set(addon_facts.IMAGELESS)))

    def addon_images(self, name: str) -> tuple[CatalogImage, ...]:
        """Images of one addon (not those of the addons it enables, see `expand_addons`)."""
        wanted = addon_facts.canonical_name(name)
        for addon, images in self._addons:
            if addon == wanted:
                return images
        if wanted in addon_facts.IMAGELESS:
            return ()
        known = ", ".join(self.addons())
        if wanted in _all_addon_names():
            elsewhere = ", ".join(dict.fromkeys(r.version for r in releases() if wanted in r.addons()))
            raise UnknownAddon(
                f"the catalog has no image data for addon {name!r} in MicroK8s {self.name} "
                f"(it has for {elsewhere})",
                hint=f"addons known for {self.name}: {known}; name that addon's images with --image or "
                     "--images-from, or pass its rendered manifests with --manifests")
        raise UnknownAddon(f"unknown MicroK8s addon {name!r}",
                           hint=f"addons known for {self.name}: {known}; for any other addon (community/…), "
                                "name its images with --image or --images-from")

    def addon_requires(self, name: str) -> tuple[str, ...]:
        """Addons that enabling `name` enables too (`registry` → `hostpath-storage`)."""
        return addon_facts.REQUIRES.get(addon_facts.canonical_name(name), ())

    def expand_addons(self, names: Iterable[str]) -> tuple[tuple[str, str | None], ...]:
        """Each addon to enable with the addon that pulled it in (None when asked for by name).

        Checks every name first, so an unknown addon fails before anything is done.
        """
        chosen: dict[str, str | None] = {}
        for name in names:
            self.addon_images(name)
            chosen.setdefault(addon_facts.canonical_name(name), None)
        queue = list(chosen)
        while queue:
            current = queue.pop(0)
            for dep in self.addon_requires(current):
                if dep not in chosen:
                    self.addon_images(dep)
                    chosen[dep] = current
                    queue.append(dep)
        return tuple(chosen.items())

    def addon_notes(self, name: str) -> tuple[str, ...]:
        """Caveats about an addon in this release: charts fetched at enable time, unverified tags."""
        wanted = addon_facts.canonical_name(name)
        out = [note.text for note in addon_facts.NOTES if note.applies(wanted, self.version_tuple)]
        out += [text for addon, text in self._addon_notes if addon == wanted]
        return tuple(out)

    def images_txt(self) -> tuple[Reference, ...]:
        """Upstream's images.txt for this release (a hint, often stale; see the module docstring)."""
        return self._images_txt

    def images_txt_differences(self) -> ImagesTxtDiff:
        """Compare images.txt with core + the addons it covers (dns, storage, ingress, metrics-server)."""
        covered = {"dns", "hostpath-storage", "ingress", "metrics-server"}
        ours = {image.reference for image in self._core}
        for addon, images in self._addons:
            if addon in covered:
                ours |= {image.reference for image in images}
        theirs = set(self._images_txt)
        return ImagesTxtDiff(tuple(sorted(theirs - ours)), tuple(sorted(ours - theirs)))

    def to_json(self) -> dict[str, Any]:
        return {
            "release": self.name,
            "aliases": list(self.aliases),
            "channel": self.channel(),
            "snap_base": self.snap_base,
            "confinement": self.confinement,
            "core_images": [{"reference": str(i.reference), "source": i.source} for i in self._core],
            "addons": {name: [{"reference": str(i.reference), "source": i.source}
                              for i in self.addon_images(name)] for name in self.addons()},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Channel:
    """A snap channel of MicroK8s: a release plus track, risk and optional branch."""

    release: Release
    track: str
    risk: str = "stable"
    branch: str | None = None

    def __str__(self) -> str:
        return f"{self.track}/{self.risk}" + (f"/{self.branch}" if self.branch else "")


def releases() -> tuple[Release, ...]:
    """Every release the catalog knows, oldest first (classic, strict, eksd for each version)."""
    return _catalog().releases


def release(name: str | Release) -> Release:
    """A release by name or channel: `1.32`, `v1.32`, `1.32-strict/stable`, `1.24-eksd`, `latest`."""
    if isinstance(name, Release):
        return name
    return channel(name).release


def channel(text: str) -> Channel:
    """Parse `TRACK[/RISK[/BRANCH]]`: `1.32`, `1.32-strict/edge`, `latest/stable` (risk: stable)."""
    catalog = _catalog()
    parts = text.strip().lower().split("/")
    track, risk = parts[0], (parts[1] if len(parts) > 1 else "stable")
    branch = parts[2] if len(parts) > 2 else None
    found: Release | None = None
    if len(parts) <= 3 and risk in RISKS and branch != "":
        if track in NEWEST_ALIASES:
            found, track = catalog.newest, "latest"
        elif (match := _TRACK_RE.match(track)) is not None:
            flavour = match["flavour"]
            found = catalog.by_name.get(match["version"] + (f"-{flavour}" if flavour else ""))
            if found is not None:
                track = found.track
    if found is None:
        raise UnknownRelease(
            f"{text!r} is not a MicroK8s release the catalog knows",
            hint=f"known releases: {', '.join(known_release_names())}; "
                 f"a channel such as 1.32/stable or 1.32-strict/stable works too")
    return Channel(found, track, risk, branch)


def known_release_names() -> tuple[str, ...]:
    """Every accepted release name, aliases last (`…, 1.36, master, latest`)."""
    catalog = _catalog()
    return tuple(r.name for r in catalog.releases) + NEWEST_ALIASES


# --- building the catalog from the data files -------------------------------------------------


@dataclass
class _Data:
    core: dict[str, list[tuple[str, Reference]]] = field(default_factory=dict)
    table: dict[str, dict[str, list[tuple[Reference, str]]]] = field(default_factory=dict)
    unresolved: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    bases: dict[str, tuple[str, str]] = field(default_factory=dict)
    images_txt: dict[str, tuple[Reference, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Catalog:
    releases: tuple[Release, ...]
    by_name: dict[str, Release]
    newest: Release


def _data_dir() -> Traversable:
    return resources.files("gapkit.catalog").joinpath("data")


def _read(*parts: str) -> str:
    node = _data_dir()
    for part in parts:
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def _rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            yield line.split("\t")


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def _load() -> _Data:
    data = _Data()
    for ref, kind, _written, image in _rows(_read("core-by-branch.tsv")):
        data.core.setdefault(ref, []).append((kind, Reference.parse(image)))
    for ref, addon, image, _written, source in _rows(_read("addon-images-by-version.tsv")):
        if "<unresolved>" in image:
            data.unresolved.setdefault(ref, []).append((addon, image.split(":")[0], source))
            continue
        data.table.setdefault(ref, {}).setdefault(addon, []).append((Reference.parse(image), source))
    for line in _read("snap-bases.txt").splitlines():
        if line.strip() and not line.startswith("#"):
            ref, base, confinement, *_ = line.split()
            data.bases[ref] = (base, confinement)
    for entry in _data_dir().joinpath("images").iterdir():
        if entry.name.endswith(".txt"):
            refs = tuple(Reference.parse(line.strip()) for line in entry.read_text(encoding="utf-8")
                         .splitlines() if line.strip() and not line.startswith("#"))
            data.images_txt[entry.name[: -len(".txt")]] = refs
    return data


def _classify(ref: Reference) -> tuple[Group, str]:
    """Which part of MicroK8s an images.txt line belongs to, by image name."""
    last = ref.path.rsplit("/", 1)[-1]
    if ref.path.startswith("calico/"):
        return "core", "calico"
    if last == "pause":
        return "core", "pause"
    if last == "coredns":
        return "addon", "dns"
    if last in ("hostpath-provisioner", "busybox"):
        return "addon", "hostpath-storage"
    if ref.path.endswith("ingress-nginx/controller") or last == "traefik":
        return "addon", "ingress"
    if last == "metrics-server":
        return "addon", "metrics-server"
    raise ValueError(f"images.txt names {ref}, which the catalog cannot place")


def _build(data: _Data, version: str, flavour: Flavour, *, newest: bool = False) -> Release:
    vt = _version_tuple(version)
    key = version if flavour == "classic" else f"{version}-{flavour}"
    core_key = "master" if newest else version
    table_key: str | None = "main" if newest else (version if version in data.table else None)
    txt_key = base_key = f"tag-v{version}" if newest else key
    txt = data.images_txt[txt_key]
    base, confinement = data.bases[base_key]
    notes: list[str] = []
    core: list[CatalogImage] = []
    addon_images: dict[str, list[CatalogImage]] = {}
    addon_notes: list[tuple[str, str]] = []

    def add_addon(image: CatalogImage) -> None:
        images = addon_images.setdefault(image.name, [])
        if image.reference not in {i.reference for i in images}:
            images.append(image)

    txt_origin = f"canonical/microk8s {txt_key}: build-scripts/images.txt"
    if flavour == "eksd":
        notes.append(f"MicroK8s {key}: no image data worked out from source exists for eksd branches; "
                     f"every image comes from upstream's images.txt of {key}")
        for ref in txt:
            group, name = _classify(ref)
            image = CatalogImage(ref, group, name, key, txt_origin, from_images_txt=True)
            if group == "core":
                core.append(image)
            else:
                add_addon(image)
    else:
        for kind, ref in data.core[core_key]:
            image = CatalogImage(ref, "core", kind, key, _CORE_ORIGIN[kind].format(ref=core_key))
            if kind != "coredns" or vt >= DNS_AT_INSTALL:
                core.append(image)
            if kind == "coredns" and table_key is None:
                add_addon(CatalogImage(ref, "addon", "dns", key, image.origin))
        if table_key is not None:
            for addon, rows in data.table[table_key].items():
                for ref, source in rows:
                    add_addon(CatalogImage(ref, "addon", addon, key, source))
                    if any(marker in source for marker in _UNVERIFIED_MARKERS):
                        addon_notes.append((addon, f"{ref} ({addon}) is not verified from source: {source}"))
            for addon, repo, source in data.unresolved.get(table_key, []):
                addon_notes.append((addon, f"the tag of {repo} used by {addon} in MicroK8s {key} is not "
                                           f"known ({source}); find it with helm template and add it with "
                                           "--image"))
        for ref in txt:
            group, name = _classify(ref)
            if group != "addon":
                continue
            if table_key is None:
                if not (name == "dns" and "dns" in addon_images):  # coredns.yaml beats images.txt
                    add_addon(CatalogImage(ref, "addon", name, key, txt_origin, from_images_txt=True))
                continue
            if not (newest or REFRESHED[0] <= vt <= REFRESHED[1]):
                continue
            twins = [i.reference for i in addon_images.get(name, [])
                     if i.reference.repository == ref.repository]
            if twins and ref not in twins:
                origin = (f"{txt_origin}: upstream's daily check found the published snap running this tag, "
                          f"while core-addons {table_key} names {twins[0]}; both are carried")
                add_addon(CatalogImage(ref, "addon", name, key, origin, from_images_txt=True))
                if name == "dns" and vt >= DNS_AT_INSTALL:
                    core.append(CatalogImage(ref, "core", "coredns", key, origin, from_images_txt=True))
    if newest:
        notes.append(f"MicroK8s {version} has no release branch in the catalog's data: its images come from "
                     f"microk8s master and core-addons main (tag v{version} was cut from master); where the "
                     f"tag's images.txt names other tags, both are carried")
    return Release(
        version=version, flavour=flavour, snap_base=base, confinement=confinement, notes=tuple(notes),
        aliases=NEWEST_ALIASES if newest else (), _core=tuple(core),
        _addons=tuple((name, tuple(images)) for name, images in sorted(addon_images.items())),
        _addon_notes=tuple(addon_notes), _images_txt=txt)


@functools.cache
def _catalog() -> _Catalog:
    data = _load()
    built: list[Release] = []
    branches = {ref.split("-")[0] for ref in data.images_txt if not ref.startswith(("tag-", "master"))}
    versions = sorted(branches, key=_version_tuple)
    for version in versions:
        if _version_tuple(version) < MIN_VERSION:
            continue
        for flavour in _FLAVOURS:
            key = version if flavour == "classic" else f"{version}-{flavour}"
            if key in data.images_txt and key in data.bases and (flavour == "eksd" or version in data.core):
                built.append(_build(data, version, flavour))
    newest_version = max((ref[len("tag-v"):] for ref in data.images_txt if ref.startswith("tag-v")),
                         key=_version_tuple)
    if newest_version in versions:  # a branch exists for it: the newest is an ordinary release
        newest = next(r for r in built if r.name == newest_version)
    else:
        newest = _build(data, newest_version, "classic", newest=True)
        built.append(newest)
    return _Catalog(tuple(built), {r.name: r for r in built}, newest)


@functools.cache
def _all_addon_names() -> frozenset[str]:
    return frozenset(name for r in _catalog().releases for name in r.addons())


def addon_names() -> tuple[str, ...]:
    """Every addon some release of the catalog knows."""
    return tuple(sorted(_all_addon_names()))


def split_names(values: Sequence[str]) -> tuple[str, ...]:
    """`["dns,ingress", "registry"]` → `("dns", "ingress", "registry")` (as `--addons` is given)."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())
