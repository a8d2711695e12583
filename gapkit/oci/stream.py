"""Digest checking in the stream: the one place where blob bytes are verified."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from gapkit.errors import DigestMismatch
from gapkit.oci.model import Descriptor

#: Chunks at least this large are hashed in a worker thread, so that hashing (which releases
#: the GIL) overlaps with network and disk I/O on the event loop.
THREAD_HASH_THRESHOLD = 256 * 1024


class VerifiedStream:
    """Wrap a blob stream; raise `DigestMismatch` at its end if the bytes are wrong.

    The error is raised before the last chunk is handed on, so a consumer that commits only
    after the stream is exhausted never commits wrong content. A stream that runs past the
    descriptor's size fails at once, so a hostile source cannot feed an endless blob.

    `checked_by_destination=True` leaves the hashing to a destination that checks every digest
    itself before it keeps anything (a registry: see `Store.verifies_digests`); the size is
    still enforced here.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        descriptor: Descriptor,
        where: str = "",
        on_bytes: Callable[[int], None] | None = None,
        checked_by_destination: bool = False,
    ) -> None:
        self.checked_by_destination = checked_by_destination
        self._chunks = chunks
        self.descriptor = descriptor
        self.where = where
        self._on_bytes = on_bytes
        self.received = 0
        self._generator: AsyncGenerator[bytes, None] = self._iterate()

    def __aiter__(self) -> VerifiedStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._generator.__anext__()

    async def aclose(self) -> None:
        """Release the source stream (a store that mounts a blob never reads it)."""
        await self._generator.aclose()
        closer = getattr(self._chunks, "aclose", None)
        if closer is not None:
            await closer()

    async def _iterate(self) -> AsyncGenerator[bytes, None]:
        hasher = None if self.checked_by_destination else self.descriptor.digest.hasher()
        expected_size = self.descriptor.size
        pending: bytes | None = None
        try:
            async for chunk in self._chunks:
                if not chunk:
                    continue
                self.received += len(chunk)
                if self.received > expected_size:
                    raise DigestMismatch(
                        str(self.descriptor.digest),
                        f"it is longer than the {expected_size} bytes its descriptor declares",
                        self.where,
                    )
                if hasher is None:
                    pass
                elif len(chunk) >= THREAD_HASH_THRESHOLD:
                    await asyncio.to_thread(hasher.update, chunk)
                else:
                    hasher.update(chunk)
                if self._on_bytes is not None:
                    self._on_bytes(len(chunk))
                if pending is not None:
                    yield pending
                pending = chunk
        finally:
            closer = getattr(self._chunks, "aclose", None)
            if closer is not None:
                await closer()
        if self.received != expected_size:
            raise DigestMismatch(
                str(self.descriptor.digest),
                f"it is {self.received} bytes where its descriptor declares {expected_size}",
                self.where,
            )
        actual = (f"{self.descriptor.digest.algorithm}:{hasher.hexdigest()}" if hasher is not None
                  else str(self.descriptor.digest))
        if actual != str(self.descriptor.digest):
            raise DigestMismatch(str(self.descriptor.digest), actual, self.where)
        if pending is not None:
            yield pending
