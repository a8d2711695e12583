"""What `registry serve` serves: a bundle, an image tar or an OCI layout, indexed once at start.

`open_source(path)` opens the store (a gapkit bundle through the bundle reader, so a damaged
bundle is refused; any other tar as an archive; a folder as an OCI layout), reads every named
image's manifest (and the platform manifests of indexes, as deep as they go), checks each one
against its digest, and keeps:

- every repository with its tags, by upstream (`docker.io/calico/cni`, `quay.io/team/app`);
- the manifests themselves (exact bytes; real ones are a few KiB), by digest;
- for each repository, the manifests and blobs reachable from its tags: a request may only
  reach content through a repository that refers to it, as in distribution;
- where each blob's bytes are: (file, offset, size) inside the tar, or the layout's blob file.

Requests never name a file: the server looks digests up in this index, and the only paths it
opens are the archive itself and layout blob files named by digests from checked manifests.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.bundle.sources import open_image_source
from gapkit.errors import GapkitError, ManifestError, NotFound, StoreError, UsageError
from gapkit.oci.model import Descriptor, Digest, Manifest
from gapkit.oci.reference import DOCKER_HUB, Reference, Repository
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.layout import LayoutStore

#: Index nesting followed below a tagged manifest (index of indexes).
MAX_DEPTH = 4


@dataclass(frozen=True)
class BlobLocation:
    """A blob's bytes: `size` bytes from `offset` in `path` (the tar, or a layout blob file)."""

    path: Path
    offset: int
    size: int
    #: A layout blob file: opened with O_NOFOLLOW, so a symbolic link there is never followed.
    own_file: bool = False


@dataclass
class RepositoryContent:
    """One repository of the source: its tags and what they reach."""

    repository: Repository
    tags: dict[str, Digest] = field(default_factory=dict)
    manifests: set[Digest] = field(default_factory=set)
    blobs: set[Digest] = field(default_factory=set)


@dataclass
class Source:
    """The indexed source; see the module docstring."""

    path: Path
    kind: str  # "bundle", "archive" (OCI or docker save tar), "layout"
    store: Store
    repositories: dict[Repository, RepositoryContent]
    manifests: dict[Digest, Manifest]
    #: Expected size of each blob, from the manifests that refer to it.
    blob_sizes: dict[Digest, int]
    #: What is wrong in the source (damaged or missing manifests); those images are not served.
    problems: list[str] = field(default_factory=list)

    @property
    def registries(self) -> list[str]:
        return sorted({repo.registry for repo in self.repositories})

    @property
    def image_count(self) -> int:
        return sum(len(content.tags) for content in self.repositories.values())

    async def locate(self, digest: Digest) -> BlobLocation | None:
        """Where the blob's bytes are, or None when the source lacks them."""
        store = self.store
        assert isinstance(store, (ArchiveStore, LayoutStore))
        found = await store.blob_location(digest)
        if found is None:
            return None
        path, offset, size = found
        # A layout's blob is a file of its own (a regular file, never a link: see LayoutStore).
        return BlobLocation(path, offset, size, own_file=isinstance(store, LayoutStore))

    async def close(self) -> None:
        await self.store.close()


async def open_source(path: Path) -> Source:
    """Open and index `path`; raise a `GapkitError` saying why it cannot be served."""
    opened = await open_image_source(path)
    store = opened.store
    try:
        source = Source(path, opened.kind, store, {}, {}, {})
        images = await store.images()
        for ref in images:
            await _add_image(source, ref)
        if not source.repositories:
            hint = "the source holds no image with a name (index.json annotations or RepoTags)"
            if source.problems:
                hint = source.problems[0]
            raise UsageError(f"{path} holds no image that can be served", hint=hint)
    except BaseException:
        await store.close()
        raise
    return source


async def _add_image(source: Source, ref: Reference) -> None:
    if ref.tag is None:
        return
    name = Reference(ref.repository, ref.tag)
    try:
        top = await source.store.get_manifest(name)
    except GapkitError as exc:
        source.problems.append(f"{name}: {exc.message}; not served")
        return
    if ref.digest is not None and top.digest != ref.digest:
        source.problems.append(f"{name}: its manifest is {top.digest}, not {ref.digest}; not served")
        return
    content = source.repositories.get(ref.repository)
    if content is None:
        content = source.repositories[ref.repository] = RepositoryContent(ref.repository)
    if top.digest not in content.manifests:  # else another tag of it reached all it needs
        reached = set(content.manifests)
        try:
            await _reach(source, content, top, ref.repository, 0)
        except ManifestError as exc:
            source.problems.append(f"{name}: {exc.message}; not served")
            content.manifests = reached  # what this image half reached is not a reached image
            if not content.tags:
                del source.repositories[ref.repository]
            return
    content.tags[ref.tag] = top.digest


async def _reach(source: Source, content: RepositoryContent, manifest: Manifest,
                 repository: Repository, depth: int) -> None:
    source.manifests.setdefault(manifest.digest, manifest)
    content.manifests.add(manifest.digest)
    _add_blobs(source, content, manifest.blobs)
    if not manifest.is_index:
        return
    if depth >= MAX_DEPTH:
        raise ManifestError(f"its indexes nest more than {MAX_DEPTH} deep")
    for child in manifest.manifests:
        if child.digest in content.manifests:
            continue
        known = source.manifests.get(child.digest)
        if known is None:
            try:
                known = await source.store.get_manifest(Reference(repository, digest=child.digest))
            except NotFound:
                continue  # a platform the source was not made for: not served, not a problem
            except GapkitError as exc:
                source.problems.append(f"{repository.name}@{child.digest}: {exc.message}; "
                                       "not served")
                continue
        await _reach(source, content, known, repository, depth + 1)


def _add_blobs(source: Source, content: RepositoryContent, blobs: Iterable[Descriptor]) -> None:
    for blob in blobs:
        if blob.is_foreign:
            continue  # non-distributable layers are fetched from their URLs, never from here
        content.blobs.add(blob.digest)
        source.blob_sizes.setdefault(blob.digest, blob.size)


def docker_hub_path(path: str) -> str:
    """Docker Hub's normalisation of a repository path: one component gets `library/`."""
    return path if "/" in path else f"library/{path}"


@dataclass(frozen=True)
class Resolution:
    """What a request's name (and `ns`) stands for: one repository, or why not."""

    repositories: tuple[RepositoryContent, ...]
    #: Set when the name fits several upstreams: their names, for the error detail.
    ambiguous: tuple[str, ...] = ()


def resolve(source: Source, name: str, ns: str | None) -> Resolution:
    """The repository a request names.

    `ns` (what containerd adds to every request to a mirror) picks the upstream, so
    `docker.io/team/app` and `quay.io/team/app` never collide. Without it, in order: a first
    component naming an upstream of the source (`registry.k8s.io/pause`, the `override_path`
    layout), Docker Hub's reading (`calico/cni`, `nginx` -> `library/nginx`), then the one
    repository of any upstream with exactly that path (`pause` -> `registry.k8s.io/pause`
    when only that exists). Several such repositories: ambiguous, named in the answer.
    """
    repos = source.repositories
    first, sep, rest = name.partition("/")
    if ns is not None:
        found = repos.get(Repository(ns, docker_hub_path(name) if ns == DOCKER_HUB else name))
        if found is None and sep and first == ns:
            found = repos.get(Repository(ns, docker_hub_path(rest) if ns == DOCKER_HUB else rest))
        return Resolution((found,) if found is not None else ())
    if sep and "." in first:
        from gapkit.oci.reference import normalise_registry

        upstream = normalise_registry(first)
        found = repos.get(Repository(upstream, docker_hub_path(rest) if upstream == DOCKER_HUB
                                     else rest))
        if found is not None:
            return Resolution((found,))
    hub = repos.get(Repository(DOCKER_HUB, docker_hub_path(name)))
    if hub is not None:
        return Resolution((hub,))
    same_path = tuple(content for repo, content in sorted(repos.items()) if repo.path == name)
    if len(same_path) == 1:
        return Resolution(same_path)
    return Resolution(same_path, tuple(c.repository.name for c in same_path))


def open_blob_fd(location: BlobLocation) -> int:
    """An fd for the blob's file: the archive, or a layout blob file (never through a link).

    `StoreError` when the file cannot be read; the `OSError` itself (EMFILE, ENFILE) when the
    process is out of file descriptors for now, which says nothing about the file."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    if location.own_file:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(location.path, flags)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise
        raise StoreError(f"cannot read {location.path}: {exc.strerror or exc}") from None
    if location.own_file and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{location.path} is not a regular file")
    return fd
