"""One list of the images a cluster needs: MicroK8s core and addons, manifests and charts, images named.

`resolve_images` is what `gapkit images list` prints and what `bundle create` fetches: every image
normalised (`nginx` is `docker.io/library/nginx:latest`), listed once, with every place it came
from. Bad input is collected and reported together, so one run shows every line to fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapkit.catalog.discovery import Problem, discover
from gapkit.catalog.releases import Channel, Release, channel, split_names
from gapkit.errors import InvalidReference, UsageError
from gapkit.oci.reference import Reference

IMAGE_FLAG_SOURCE = "--image"


class ImageListError(UsageError):
    """Some of the input naming images is wrong; `problems` lists each one."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        hints = list(dict.fromkeys(p.hint for p in self.problems if p.hint))
        if len(self.problems) == 1:
            message = self.problems[0].message
        else:
            message = f"{len(self.problems)} problems in the images to list:\n" + "\n".join(
                f"  {p.message}" for p in self.problems)
        super().__init__(message, "; ".join(hints) or None)


@dataclass(frozen=True)
class ResolvedImage:
    """One image and every source that asked for it (`core:pause (microk8s 1.32)`, `--image`, …)."""

    reference: Reference
    sources: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": str(self.reference),
            "registry": self.reference.registry,
            "repository": self.reference.path,
            "tag": self.reference.tag,
            "digest": str(self.reference.digest) if self.reference.digest else None,
            "sources": list(self.sources),
        }


@dataclass(frozen=True)
class ImageList:
    """The images to carry, sorted by reference, with what was learnt on the way."""

    images: tuple[ResolvedImage, ...]
    release: Release | None = None
    addons: tuple[tuple[str, str | None], ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    channel: Channel | None = None

    def __iter__(self) -> Iterator[ResolvedImage]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(image.reference for image in self.images)

    @property
    def snap_base(self) -> str | None:
        """The base snap MicroK8s needs (`core20`), None without a release."""
        return self.release.snap_base if self.release else None

    @property
    def registries(self) -> tuple[str, ...]:
        """Every upstream registry involved (each needs a mirror on the air-gapped side)."""
        return tuple(sorted({image.reference.registry for image in self.images}))

    def to_json(self) -> dict[str, Any]:
        microk8s = None
        if self.release is not None:
            microk8s = {
                "release": self.release.name,
                "channel": str(self.channel) if self.channel else self.release.channel(),
                "snap_base": self.release.snap_base,
                "confinement": self.release.confinement,
            }
        return {
            "microk8s": microk8s,
            "addons": [{"name": name, "enabled_by": by} for name, by in self.addons],
            "images": [image.to_json() for image in self.images],
            "registries": list(self.registries),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def resolve_images(
    microk8s: str | Release | None = None,
    addons: Sequence[str] = (),
    manifests: Sequence[Path | str] = (),
    images: Sequence[str] = (),
    images_from: Sequence[Path | str] = (),
    *,
    helm: str | None = None,
) -> ImageList:
    """The full, de-duplicated image list for a MicroK8s release, its addons and the workloads.

    `microk8s` is a release or channel (`1.32`, `1.32-strict/stable`, `latest`) or None for just the
    images named; `addons` are addon names (`"dns,ingress"` items are split); `manifests` are files,
    folders and Helm charts; `images` are references; `images_from` are files with one reference a
    line. Unknown releases and addons raise `UsageError` listing the known ones; every bad image
    string, bad line or unrenderable chart is collected into one `ImageListError`.
    """
    if microk8s is None and not (addons or manifests or images or images_from):
        raise UsageError("no images asked for", hint="give a MicroK8s release (--microk8s 1.32), "
                                                     "--manifests, --image or --images-from")
    sources: dict[Reference, list[str]] = {}
    problems: list[Problem] = []
    warnings: list[str] = []
    notes: list[str] = []

    def add(reference: Reference, source: str) -> None:
        seen = sources.setdefault(reference, [])
        if source not in seen:
            seen.append(source)

    chosen_channel: Channel | None = None
    if isinstance(microk8s, Release):
        chosen_channel = Channel(microk8s, microk8s.track)
    elif microk8s is not None:
        chosen_channel = channel(microk8s)
    chosen_release = chosen_channel.release if chosen_channel else None
    addon_names = split_names(addons)
    chosen: tuple[tuple[str, str | None], ...] = ()
    if chosen_release is None:
        if addon_names:
            raise UsageError("addons were named without a MicroK8s release",
                             hint="addon images depend on the release: add --microk8s (e.g. --microk8s 1.32)")
    else:
        chosen = chosen_release.expand_addons(addon_names)
        notes += chosen_release.notes
        for image in chosen_release.core_images():
            add(image.reference, image.source)
        for name, enabled_by in chosen:
            for image in chosen_release.addon_images(name):
                add(image.reference, image.describe(enabled_by))
            notes += chosen_release.addon_notes(name)

    found = discover(manifests, helm=helm)
    for found_image in found.images:
        add(found_image.reference, found_image.source)
    warnings += [str(w) for w in found.warnings]
    problems += found.errors

    for text in images:
        try:
            add(Reference.parse(text), IMAGE_FLAG_SOURCE)
        except InvalidReference as exc:
            problems.append(Problem(f"--image: {exc.message}", exc.hint))

    for path in images_from:
        lines, bad = read_images_file(path)
        problems += bad
        for reference, number in lines:
            add(reference, f"file:{path}:{number}")

    if problems:
        raise ImageListError(problems)
    resolved = tuple(ResolvedImage(ref, tuple(srcs)) for ref, srcs in sorted(sources.items(),
                                                                             key=lambda kv: str(kv[0])))
    return ImageList(resolved, chosen_release, chosen, tuple(warnings), tuple(dict.fromkeys(notes)),
                     chosen_channel)


def read_images_file(path: Path | str) -> tuple[list[tuple[Reference, int]], list[Problem]]:
    """References in a file, one a line (`#` starts a comment), with their line numbers, and bad lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [], [Problem(f"{path}: cannot read it: {why}",
                            "give --images-from a text file, one image a line")]
    good: list[tuple[Reference, int]] = []
    bad: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            good.append((Reference.parse(entry), number))
        except InvalidReference as exc:
            bad.append(Problem(f"{path}:{number}: {exc.message}",
                               exc.hint or "one image reference a line, e.g. registry.k8s.io/pause:3.10"))
    return good, bad
