"""Snap assertions: the `.assert` files `snap download` writes beside each `.snap`.

An `.assert` file is a stream of assertions, each written by snapd's encoder as

    HEADERS "\\n\\n" [BODY "\\n\\n"] SIGNATURE "\\n"

with one more "\\n" between assertions. Headers are `name: value` lines; a header whose value
spans lines is introduced by `name:` alone and followed by a list (`  - item` lines), a map
(`  key: value` lines) or text (lines indented by four spaces), nested the same way. A body is
present when the `body-length` header says so (an `account-key` carries its public key there).
The parser follows snapd's own decoder (`asserts.Decoder`, `parseHeaders`) so that what snapd
accepts parses here, and refuses anything else with an error that names the file.

gapkit reads only what it needs: the `snap-declaration` (`snap-name`, `snap-id`,
`publisher-id`) and the `snap-revision` (`snap-sha3-384`, `snap-size`, `snap-id`,
`snap-revision`). Signatures are kept as text and never checked here: snapd checks them against
its trusted root keys when a node runs `snap ack`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from gapkit.errors import SnapError

#: A header value: text, or lists and maps of them (as snapd's `interface{}` headers).
HeaderValue: TypeAlias = "str | list[HeaderValue] | dict[str, HeaderValue]"

#: snapd's limits (asserts.MaxHeadersSize, MaxBodySize, MaxSignatureSize), so that a huge file
#: that is not an assertion stream is refused without reading it all.
MAX_HEADERS_SIZE = 128 * 1024
MAX_BODY_SIZE = 2 * 1024 * 1024
MAX_SIGNATURE_SIZE = 128 * 1024
#: An `.assert` for one snap is a few kilobytes; anything far larger is not one.
MAX_ASSERT_FILE_SIZE = 4 * 1024 * 1024

_HEADER_NAME = re.compile(r"[a-z](?:-?[a-z0-9])*")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE = re.compile(rb"[A-Za-z0-9+/=\n]+")
_COMMON_PREFIX = "  "
_MULTILINE_PREFIX = "    "
_LIST_PREFIX = "  -"

_HINT_DOWNLOAD = ("download the snap and its assertions again on a connected machine with "
                  "`snap download <name>` and keep the .snap and .assert of one download together")


@dataclass(frozen=True)
class Assertion:
    """One assertion: its headers, its body (often empty) and its unchecked signature."""

    type: str
    headers: Mapping[str, HeaderValue]
    body: bytes = b""
    signature: str = field(default="", repr=False)

    def text(self, name: str) -> str | None:
        """The header `name` if it is present and plain text, else None."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


def parse_assertions(data: bytes | str, source: str | Path) -> list[Assertion]:
    """Parse an assertion stream; `source` names the file in every error.

    Raises `SnapError` for anything snapd's decoder would refuse: headers that do not follow
    the grammar, a body shorter or longer than `body-length`, a missing signature.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    where = str(source)
    if b"\r\n" in raw:
        raise SnapError(f"{where} has Windows line endings (CRLF); snapd refuses such assertions",
                        hint=_HINT_DOWNLOAD)
    assertions: list[Assertion] = []
    pos = 0
    while True:
        while raw.startswith(b"\n", pos):  # tolerate extra blank lines between assertions
            pos += 1
        if pos >= len(raw):
            break
        number = len(assertions) + 1
        assertion, pos = _decode_one(raw, pos, f"{where}: assertion {number}")
        assertions.append(assertion)
    if not assertions:
        raise SnapError(f"{where} holds no assertions (it is empty)", hint=_HINT_DOWNLOAD)
    return assertions


def _decode_one(raw: bytes, pos: int, where: str) -> tuple[Assertion, int]:
    end = raw.find(b"\n\n", pos)
    if end < 0:
        raise _malformed(where, "no blank line after its headers (truncated, or not an assertion)")
    if end - pos > MAX_HEADERS_SIZE:
        raise _malformed(where, f"headers longer than {MAX_HEADERS_SIZE} bytes")
    try:
        head = raw[pos:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(where, "headers are not UTF-8 text (is this a binary file?)") from None
    try:
        headers = _parse_headers(head)
    except ValueError as exc:
        raise _malformed(where, str(exc)) from None
    kind = headers.get("type")
    if not isinstance(kind, str) or not kind:
        raise _malformed(where, "no `type` header")
    where = f"{where} ({kind})"
    if not isinstance(headers.get("sign-key-sha3-384"), str):
        raise _malformed(where, "no `sign-key-sha3-384` header")
    length = _int_header(headers, "body-length", where, default=0)
    if length > MAX_BODY_SIZE:
        raise _malformed(where, f"body-length {length} is larger than snapd allows")
    pos = end + 2
    body = b""
    if length:
        body = raw[pos:pos + length]
        if len(body) < length:
            raise _malformed(where, f"body is {len(body)} bytes, body-length says {length} "
                             "(the file is truncated)")
        pos += length
        if not raw.startswith(b"\n\n", pos):
            raise _malformed(where, f"body is longer than body-length {length}")
        pos += 2
    end = raw.find(b"\n\n", pos)
    stop = len(raw) if end < 0 else end
    signature = raw[pos:stop].strip(b"\n")
    if not signature:
        raise _malformed(where, "no signature")
    if len(signature) > MAX_SIGNATURE_SIZE:
        raise _malformed(where, "signature is too long")
    if not _SIGNATURE.fullmatch(signature):
        raise _malformed(where, "signature is not base64 text (is a blank line missing before "
                         "the next assertion?)")
    return Assertion(kind, headers, body, signature.decode("ascii")), stop


def _malformed(where: str, detail: str) -> SnapError:
    return SnapError(f"{where} is not a valid snap assertion: {detail}", hint=_HINT_DOWNLOAD)


def _int_header(headers: Mapping[str, HeaderValue], name: str, where: str,
                default: int | None = None) -> int:
    value = headers.get(name)
    if value is None and default is not None:
        return default
    # snapd's atoi: decimal digits, no sign, no leading zeros
    if not isinstance(value, str) or not re.fullmatch(r"0|[1-9][0-9]{0,17}", value):
        shown = "missing" if value is None else repr(value)
        raise _malformed(where, f"`{name}` must be a non-negative integer ({shown})")
    return int(value)


# -- headers, as snapd's asserts/headers.go parses them ------------------------------------------

def _parse_headers(head: str) -> dict[str, HeaderValue]:
    lines = head.split("\n")
    headers: dict[str, HeaderValue] = {}
    i = 0
    while i < len(lines):
        entry = lines[i]
        colon = entry.find(":")
        if colon < 0:
            raise ValueError(f"header line {i + 1} has no ':' ({entry[:60]!r})")
        name = entry[:colon]
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name[:60]!r} on line {i + 1}")
        value, i = _parse_entry(colon + 1, i, lines, 0)
        if name in headers:
            raise ValueError(f"header {name!r} is repeated")
        headers[name] = value
    return headers


def _parse_entry(consumed: int, first: int, lines: list[str], indent: int) -> tuple[HeaderValue, int]:
    entry = lines[first]
    i = first + 1
    if consumed == len(entry):  # `name:` alone: a list, a map or multi-line text follows
        base = " " * indent + _COMMON_PREFIX
        if i < len(lines) and lines[i].startswith(base):
            rest = lines[i][len(base):]
            if rest.startswith("-"):
                return _parse_list(i, lines, indent)
            if rest and rest[0] != " ":
                return _parse_map(i, lines, indent)
        return _parse_text(i, lines, indent)
    if entry[consumed] != " ":
        raise ValueError(f"header line {first + 1} needs a space after ':' ({entry[:60]!r})")
    return entry[consumed + 1:], i


def _parse_text(first: int, lines: list[str], indent: int) -> tuple[HeaderValue, int]:
    prefix = " " * indent + _MULTILINE_PREFIX
    j = first
    while j < len(lines) and lines[j].startswith(prefix):
        j += 1
    if j == first:
        raise ValueError(f"line {first} introduces a value but no indented lines follow it")
    return "\n".join(line[len(prefix):] for line in lines[first:j]), j


def _parse_list(first: int, lines: list[str], indent: int) -> tuple[HeaderValue, int]:
    items: list[HeaderValue] = []
    prefix = " " * indent + _LIST_PREFIX
    j = first
    while j < len(lines) and lines[j].startswith(prefix):
        item, j = _parse_entry(len(prefix), j, lines, indent + len(_LIST_PREFIX) - 1)
        items.append(item)
    return items, j


def _parse_map(first: int, lines: list[str], indent: int) -> tuple[HeaderValue, int]:
    entries: dict[str, HeaderValue] = {}
    prefix = " " * indent + _COMMON_PREFIX
    j = first
    while j < len(lines) and lines[j].startswith(prefix):
        entry = lines[j][len(prefix):]
        colon = entry.find(":")
        if colon < 0:
            raise ValueError(f"map entry on line {j + 1} has no ':' ({entry[:60]!r})")
        key = entry[:colon]
        if not _HEADER_NAME.fullmatch(key):
            raise ValueError(f"invalid map key {key[:60]!r} on line {j + 1}")
        value, j_next = _parse_entry(len(prefix) + colon + 1, j, lines, len(prefix))
        if key in entries:
            raise ValueError(f"map key {key!r} is repeated on line {j + 1}")
        entries[key] = value
        j = j_next
    return entries, j


# -- what an .assert file says about its snap ------------------------------------------------------

@dataclass(frozen=True)
class SnapAssertions:
    """The `snap-declaration` and `snap-revision` of one snap, from its `.assert` file.

    `snap download` writes these with their prerequisites (the store's `account-key`, the
    publisher's `account`), which are kept in `assertions` for completeness.
    """

    source: str
    declaration: Assertion
    revision_assertion: Assertion
    assertions: Sequence[Assertion] = field(repr=False, default=())

    @property
    def name(self) -> str:
        """The snap's name (`snap-name` of the declaration)."""
        return _required_text(self.declaration, "snap-name", self.source)

    @property
    def snap_id(self) -> str:
        return _required_text(self.revision_assertion, "snap-id", self.source)

    @property
    def publisher_id(self) -> str:
        return self.declaration.text("publisher-id") or ""

    @property
    def revision(self) -> int:
        """The store revision of the snap (`snap-revision`), as in `microk8s_7394.snap`."""
        return _int_header(self.revision_assertion.headers, "snap-revision",
                           f"{self.source} (snap-revision)")

    @property
    def size(self) -> int:
        """The snap file's size in bytes (`snap-size`)."""
        return _int_header(self.revision_assertion.headers, "snap-size",
                           f"{self.source} (snap-revision)")

    @property
    def sha3_384(self) -> str:
        """The snap file's SHA3-384 as the assertion writes it: base64url, no padding."""
        return _required_text(self.revision_assertion, "snap-sha3-384", self.source)

    @property
    def sha3_384_hex(self) -> str:
        return sha3_384_hex(self.sha3_384)

    @classmethod
    def read(cls, path: Path) -> SnapAssertions:
        """Read and check an `.assert` file."""
        try:
            size = path.stat().st_size
            if size > MAX_ASSERT_FILE_SIZE:
                raise SnapError(f"{path} is {size} bytes: far too large for a snap's assertions",
                                hint=_HINT_DOWNLOAD)
            data = path.read_bytes()
        except FileNotFoundError:
            raise SnapError(f"{path} does not exist", hint=_HINT_DOWNLOAD) from None
        except IsADirectoryError:
            raise SnapError(f"{path} is a folder, not an .assert file") from None
        except PermissionError as exc:
            raise SnapError(f"cannot read {path}: {exc.strerror}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: bytes | str, source: str | Path) -> SnapAssertions:
        return cls.from_assertions(parse_assertions(data, source), source)

    @classmethod
    def from_assertions(cls, assertions: Sequence[Assertion], source: str | Path) -> SnapAssertions:
        """Pick out the snap-revision and its snap-declaration; check that they agree."""
        where = str(source)
        revisions = [a for a in assertions if a.type == "snap-revision"]
        if len(revisions) != 1:
            kinds = ", ".join(a.type for a in assertions) or "nothing"
            raise SnapError(
                f"{where} holds {len(revisions)} snap-revision assertions (it holds: {kinds}); "
                "a snap's .assert file from `snap download` holds exactly one",
                hint=_HINT_DOWNLOAD)
        revision = revisions[0]
        snap_id = _required_text(revision, "snap-id", where)
        declarations = [a for a in assertions if a.type == "snap-declaration"]
        matching = [a for a in declarations if a.text("snap-id") == snap_id]
        if not matching:
            other = f" (it declares snap-id {declarations[0].text('snap-id')})" if declarations else ""
            raise SnapError(
                f"{where} has no snap-declaration for snap-id {snap_id}, the snap its "
                f"snap-revision is about{other}", hint=_HINT_DOWNLOAD)
        if len({a.text("snap-name") for a in matching}) > 1:
            raise SnapError(f"{where} declares more than one name for snap-id {snap_id}",
                            hint=_HINT_DOWNLOAD)
        found = cls(where, matching[-1], revision, tuple(assertions))
        _required_text(found.declaration, "snap-name", where)
        digest = found.sha3_384
        if not _B64URL.fullmatch(digest) or len(digest) != 64:
            raise _malformed(f"{where} (snap-revision)",
                             f"snap-sha3-384 {digest[:80]!r} is not 64 characters of base64url")
        if found.revision <= 0:
            raise _malformed(f"{where} (snap-revision)", "snap-revision must be at least 1")
        if found.size <= 0:
            raise _malformed(f"{where} (snap-revision)", "snap-size must be at least 1")
        return found


def _required_text(assertion: Assertion, name: str, where: str) -> str:
    value = assertion.text(name)
    if not value:
        raise _malformed(f"{where} ({assertion.type})", f"no `{name}` header")
    return value


def sha3_384_hex(b64url: str) -> str:
    """Convert a `snap-sha3-384` value (base64url, unpadded) to hex."""
    try:
        return base64.urlsafe_b64decode(b64url + "=" * (-len(b64url) % 4)).hex()
    except (binascii.Error, ValueError):
        raise SnapError(f"{b64url!r} is not a base64url SHA3-384 digest") from None


def sha3_384_b64(digest: bytes) -> str:
    """Format a raw SHA3-384 digest as `snap-sha3-384` writes it."""
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
