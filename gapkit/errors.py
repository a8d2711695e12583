"""One exception hierarchy for gapkit; the CLI catches `GapkitError` once.

Each error carries a message (what went wrong, naming the file, image or node) and a
`hint` (what to do next). Exit codes are part of the CLI contract, see `cli.py`.
"""

from __future__ import annotations

import re


class GapkitError(Exception):
    """Base of every error gapkit reports to a user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(GapkitError):
    """The command line or a spec is wrong."""

    exit_code = 2


class InvalidReference(UsageError):
    """An image reference or digest does not follow the grammar."""


class ManifestError(GapkitError):
    """A manifest or index is malformed or of a kind gapkit refuses."""


class DigestMismatch(GapkitError):
    """Content did not hash to the digest it was addressed by."""

    def __init__(self, expected: str, actual: str, where: str = "") -> None:
        place = f" from {where}" if where else ""
        is_digest = re.fullmatch(r"[a-z0-9]+:[0-9a-f]+", actual) is not None
        detail = f"it hashes to {actual}" if is_digest else actual
        super().__init__(
            f"blob {expected}{place} has the wrong content ({detail})",
            hint="the source is damaged or is not serving what it claims; nothing was kept",
        )
        self.expected = expected
        self.actual = actual


class NotFound(GapkitError):
    """A manifest, blob or repository does not exist in a store."""

    exit_code = 3


class RegistryError(GapkitError):
    """A registry answered with an error or could not be reached."""


class UploadInterrupted(RegistryError):
    """An upload broke in transit (reset, stall, 5xx) and may be sent again from a new read of
    its source; the registry store bounds how many times."""


class AuthError(RegistryError):
    """A registry refused the credentials (or got none)."""


class StoreError(GapkitError):
    """A local store (layout folder, archive) is damaged or cannot be written."""


class SnapError(GapkitError):
    """A snap or its assertion is missing, malformed, or does not match the other."""


class BundleError(GapkitError):
    """A bundle is damaged, incomplete or not a gapkit bundle."""


class NodeError(GapkitError):
    """Something on a node is missing, wrong, or could not be changed."""


class ClusterError(GapkitError):
    """A cluster-wide step (install on several nodes, join, wait for Ready) did not complete."""


class NodeStepError(ClusterError, NodeError):
    """A step on one node of a cluster failed (unreachable, refused key, timeout, a command).

    `node` and `step` name where; `output` holds what the command printed, when there was one.
    Both a ClusterError and a NodeError (so `plan.apply` puts files back when a write over SSH
    fails).
    """

    def __init__(self, node: str, step: str, message: str, hint: str | None = None,
                 output: str = "") -> None:
        super().__init__(f"{node}: {step}: {message}", hint)
        self.node = node
        self.step = step
        self.detail = message
        self.output = output
