"""The one store protocol every backend implements (registry, OCI layout, tar archive).

As in regclient's `scheme.API` and go-containerregistry's `remote`/`layout`/`tarball`, every
operation works on any backend, so `gapkit.oci.copy.copy` moves images between any two stores.

Contract shared by all backends:

- Content is addressed by `Reference` (manifests) and by `Repository` + `Digest` (blobs); a
  store that keeps blobs globally (layout, archive) ignores the repository for blobs.
- `put_blob` commits a blob only when its stream ends without error: if iterating `chunks`
  raises (for example `DigestMismatch` from `VerifiedStream`), nothing is kept. A backend that
  can check the digest itself (layout) does so unless `chunks` is already a `VerifiedStream`.
  A backend that gets the blob some cheaper way (a registry mounting it from another
  repository) may return without iterating `chunks` at all.
- `put_manifest(ref, manifest)` with a tag names the image; with a digest only it stores the
  manifest untagged (the platform manifests of an index). Callers put blobs before the
  manifests that refer to them, children before their index.
- Missing content raises `gapkit.errors.NotFound`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from gapkit.oci.model import Descriptor, Digest, Manifest
from gapkit.oci.reference import Reference, Repository

#: Read size for blob streams: large enough that hashing and writing run at disk speed.
CHUNK_SIZE = 1024 * 1024


@runtime_checkable
class Store(Protocol):
    """Where images live. Implementations: registry, OCI layout, tar archive.

    A store whose `verifies_digests` is True checks every blob's digest itself before it keeps
    the blob (a registry computes it on upload and refuses a mismatch, which the store reports
    as `DigestMismatch`); the copy engine then does not hash the same bytes a second time.
    """

    verifies_digests: bool

    async def get_manifest(self, ref: Reference) -> Manifest:
        """The manifest or index `ref` names, with its exact bytes."""
        ...

    async def head_manifest(self, ref: Reference) -> Descriptor | None:
        """The descriptor of the manifest `ref` names, or None when there is none."""
        ...

    async def put_manifest(self, ref: Reference, manifest: Manifest) -> None:
        """Store `manifest` (exact bytes); name it `ref` when `ref` has a tag."""
        ...

    async def head_blob(self, repository: Repository, digest: Digest) -> int | None:
        """The size of the blob when the store has it, else None."""
        ...

    def open_blob(
        self, repository: Repository, descriptor: Descriptor, offset: int = 0
    ) -> AsyncIterator[bytes]:
        """Stream the blob's bytes from `offset`; not verified here (see `VerifiedStream`)."""
        ...

    async def put_blob(
        self, repository: Repository, descriptor: Descriptor, chunks: AsyncIterator[bytes]
    ) -> None:
        """Store the blob streamed by `chunks`; commit only if the stream ends cleanly."""
        ...

    async def tags(self, repository: Repository) -> list[str]:
        """The tags of `repository`, sorted."""
        ...

    async def images(self) -> list[Reference]:
        """Every named image the store holds (layouts and archives; registries may refuse)."""
        ...

    async def close(self) -> None:
        """Finish writing (archives are committed here) and release connections and files."""
        ...
