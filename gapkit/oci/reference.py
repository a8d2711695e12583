"""Image references: Docker's grammar and normalisation, as plain values.

Follows distribution/reference: `nginx` is `docker.io/library/nginx:latest`, a first path
component is a registry host only if it has a `.` or a `:` or is `localhost`, and a reference
may carry a tag, a digest or both. Nothing here touches the network or the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gapkit.errors import InvalidReference
from gapkit.oci.model import Digest

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io", "docker.io"})
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True, order=True)
class Repository:
    """A repository in a registry: `registry.k8s.io` + `pause`."""

    registry: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        """Parse a repository name (`nginx`, `quay.io/metallb/speaker`): no tag, no digest."""
        if "@" in text or ":" in text.rsplit("/", 1)[-1]:
            raise InvalidReference(f"{text!r} is a reference, not a repository name")
        return Reference.parse(text).repository

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class Reference:
    """A fully qualified image reference; always has a tag, a digest, or both."""

    repository: Repository
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise `text`; raise `InvalidReference` saying why it is wrong."""
        original = text
        if not text or text != text.strip():
            raise InvalidReference(f"{original!r} is not an image reference: it is empty or padded")
        digest: Digest | None = None
        if "@" in text:
            text, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidReference as exc:
                raise InvalidReference(f"{original!r}: {exc.message}") from None
        tag: str | None = None
        last_slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > last_slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG_RE.match(tag):
                why = "the tag is empty" if not tag else f"the tag {tag!r} is not valid"
                raise InvalidReference(
                    f"{original!r} is not an image reference: {why}",
                    hint="a tag is 1-128 of letters, digits, '_', '.', '-', not starting with '.' or '-'",
                )
        registry, path = _split_registry(text, original)
        if len(path) + len(registry) + 1 > MAX_NAME_LENGTH:
            raise InvalidReference(
                f"{original!r} is not an image reference: the name is longer than "
                f"{MAX_NAME_LENGTH} characters"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(Repository(registry, path), tag, digest)

    @property
    def registry(self) -> str:
        return self.repository.registry

    @property
    def path(self) -> str:
        return self.repository.path

    @property
    def identifier(self) -> str:
        """What goes after `/manifests/`: the digest when there is one, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def with_digest(self, digest: Digest | None) -> Reference:
        return Reference(self.repository, self.tag, digest)

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.repository, tag, self.digest)

    def in_repository(self, repository: Repository) -> Reference:
        return Reference(repository, self.tag, self.digest)

    def familiar(self) -> str:
        """The short form Docker prints (`nginx:latest`, `calico/cni:v3.25.0`).

        Unlike Docker's, it stays unambiguous: `docker.io/` is kept when the first path
        component would otherwise read as a registry host.
        """
        path = self.path
        if self.registry != DOCKER_HUB:
            return f"{self.registry}/{path}{self._suffix()}"
        parts = path.split("/")
        if len(parts) == 2 and parts[0] == "library":
            path = parts[1]
        elif "." in parts[0] or ":" in parts[0] or parts[0] == "localhost":
            path = f"{DOCKER_HUB}/{path}"
        return path + self._suffix()

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag is not None else ""
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def __str__(self) -> str:
        return f"{self.repository.name}{self._suffix()}"


def is_registry_host(text: str) -> bool:
    """Whether `text` is a registry host as references write it (`HOST[:PORT]`, `[v6]:PORT`)."""
    return bool(_DOMAIN_RE.match(text))


def normalise_registry(host: str) -> str:
    """`index.docker.io` and `registry-1.docker.io` are `docker.io`; other hosts stay."""
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _split_registry(name: str, original: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN_RE.match(first):
            raise InvalidReference(f"{original!r}: {first!r} is not a valid registry host")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    registry = normalise_registry(registry)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path:
        raise InvalidReference(f"{original!r} is not an image reference: the repository is empty")
    for component in path.split("/"):
        if _PATH_COMPONENT_RE.match(component):
            continue
        if component in ("", ".", ".."):
            why = f"it has an empty or {component!r} path component" if component else (
                "it has an empty path component"
            )
        elif component.lower() != component:
            why = f"repository names must be lower case ({component!r})"
        else:
            why = f"{component!r} is not a valid repository path component"
        raise InvalidReference(
            f"{original!r} is not an image reference: {why}",
            hint="path components are lower-case letters and digits, joined by '.', '_', '__' or '-'",
        )
    return registry, path
