"""The `.assert` format: what `snap download` writes parses; anything else is refused by name.

No stand-ins here: the parser reads text. `REAL_FORMAT` is modelled on `.assert` files written by
`snap download` (snapd's encoder: headers, a blank line, the body when `body-length` says so, a
blank line, a base64 signature wrapped at 76 columns, one blank line between assertions). Its
values are made up; its signatures are placeholders (gapkit never checks them: snapd does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gapkit.errors import SnapError
from gapkit.snaps import Assertion, SnapAssertions, parse_assertions, sha3_384_b64, sha3_384_hex
from tests.support.snaps import assertion_text, make_snap

ACCOUNT_KEY_BODY = """\
AcbBTQQvRqHqF95ySV8JEmWCJYnWG6GIZzciXozDKYVXMRlyP34501XWRhc4tOrfOI7CAmDpoHcW
zXcHg2fsIiShQ2bPmK2AssSFSla7bJc4nXk9PazOZ8zp6IeVoEAieGfmQW75zeQiWIQYWrcUdSYK
9/VElwKH73+nxJSreDeVAOXjiYprznng3dUwFPY5ep9AUMx21feaVvxUEy+tH/IEsBhbopr8OpFy
yGl0e9dWyig6Q/4tG4QTH5TGrKVBzdXB5HjTYTrHu/BTaLYg7FrN/VupwFzE8OU8kK58EWu8qjGd
ouYOrmHFSPs6N1K0E3lZmhnWacvua5p67MK1aXabhOKEG7gknnYTIUm/mKjGkFOFE+tLlDW/rjPp
DMxzaYHz+5viwgXqr5LRyCCcV5bQPUEHnfRf6G6kmGBTXSzQ4Hpjw+aiLEXSxNnuB3aDiPaiqZxu
qNQUQ2IhbSde68ro8/9NAUIbRFEgf8f9MrIMjep5wdET6vgfXDFMyIzsdg6AB7WcmpDNvqtyR7y+
MPX/hNnvVpXl2EEzPP+oFrfs0c415uY5gMPZWpKOInjS40w6yiLBerAxWUBnm3U0ehbLgu+kQ0BJ
pet8oV84tbgAhckPxu077aW8l/6pfbHZfwsQTRvUXoMNj980a8Ixsf06F8IF9akkFiYjhD8QUifF
z3M/gXgaa62p0974vv/hgwav"""

REAL_FORMAT = f"""\
type: account-key
authority-id: canonical
revision: 2
public-key-sha3-384: BWDEoaqyr25nF5SNCvEv2v7QnM9QsfCc0PBMYD_i2NGSQ32EF2d4D0hqUel3m8ul
account-id: canonical
name: store
since: 2016-04-01T00:00:00.0Z
body-length: 717
sign-key-sha3-384: -CvQKAwRQ5h3Ffn10FILJoEZUXOv6km9FwA80-Rcj-f-6jadQ89VRswHNiEB9Lxk

{ACCOUNT_KEY_BODY}

AcLBUgQAAQoABgUCSli3kd9q8dgwPmHNxLuGw9HEJxA8NExBiesvHnvV1H5Eb87Co9gRc2EQ5Xgb
zM6mlnYuYRbG6cktmb81jC4HGIIs5Hyox0EH5myw5LKz9NWNgspjhtLJbnYOgZuFySTDWXFkxKYF
igBYGiKyLeUEckM9LkT+2La4NX5EzTEpkDrB1FWXokL98R+PKxo588PmkxFDUdy+1Afj5rYFuZ6D
XH0=

type: account
authority-id: canonical
account-id: canonical
display-name: Canonical
timestamp: 2016-04-01T00:00:00.0Z
username: canonical
validation: verified
sign-key-sha3-384: -CvQKAwRQ5h3Ffn10FILJoEZUXOv6km9FwA80-Rcj-f-6jadQ89VRswHNiEB9Lxk

AcLBUgQAAQoABgUC0xlyF90ruhU3Q25cJEHj1UQQSSt4h2i8/yIYz49zc6vo45Ta+AfiTljDZ0Au
KB+b3fhTNtFbV5t05CUJUMnJlHUmZq6Bx4soNZLt/5NdQG6P23KjSYC+ZNNHvc3aURe5GfU43Ld+
FoE=

type: snap-declaration
format: 1
authority-id: canonical
revision: 7
series: 16
snap-id: EaXqgt1lyCaxKaQCU349mlodBkDCXRcg
aliases:
  -
    name: kubectl
    target: kubectl
auto-aliases:
  - microk8s.kubectl
plugs:
  kubernetes-support:
    allow-installation: true
  network-control:
    allow-auto-connection:
      slot-snap-type:
        - core
publisher-id: canonical
snap-name: microk8s
timestamp: 2024-02-13T15:27:44.186112Z
sign-key-sha3-384: BWDEoaqyr25nF5SNCvEv2v7QnM9QsfCc0PBMYD_i2NGSQ32EF2d4D0hqUel3m8ul

AcLBUgQAAQoABgUCklC3l0qbUotpY2MhpGG1XvVbe+r9gJqanpJbeaY0L6D9uLKU2X/GED2SCJsl
+l4Dn1Ko6KlfZNZYnB94RAZlQuw4AI0zHf07JyQWMXaU4v6GA5e3dDBjeLVDfYp1ViLW16C0jLBI
FGk=

type: snap-revision
authority-id: canonical
snap-sha3-384: Wr_HvCoJphL4eYfOBwY0oJMtMYkaYaDsWY6B5uxhbJ8A8F_2JwcMv2ywSZscM01N
developer-id: canonical
snap-id: EaXqgt1lyCaxKaQCU349mlodBkDCXRcg
snap-revision: 7394
snap-size: 186716160
timestamp: 2025-01-14T16:31:02.120539Z
sign-key-sha3-384: BWDEoaqyr25nF5SNCvEv2v7QnM9QsfCc0PBMYD_i2NGSQ32EF2d4D0hqUel3m8ul

AcLBUgQAAQoABgUC/PmkTccWaRrNq6G4qRJkZUPGl3paQ6wnU88QFzEiBxETvRIFNqvOZmaZpYwJ
Gv/qaocUSv9x6sxSRHL9WLLhw8aZEA/sSNA4V/Q0hW7cY4mzAjlceqzURpNnnccKvjMsy9yt0w7U
xzw=
"""


def test_stream_as_snap_download_writes_it_parses_every_assertion() -> None:
    assertions = parse_assertions(REAL_FORMAT.encode(), "microk8s_7394.assert")
    assert [a.type for a in assertions] == ["account-key", "account", "snap-declaration",
                                            "snap-revision"]
    key, account, declaration, revision = assertions
    assert len(ACCOUNT_KEY_BODY) == 717
    assert key.body == ACCOUNT_KEY_BODY.encode()
    assert key.text("name") == "store"
    assert key.signature.startswith("AcLBUgQAAQoABgUCSli3") and key.signature.endswith("\nXH0=")
    assert account.text("validation") == "verified" and account.body == b""
    assert declaration.headers["aliases"] == [{"name": "kubectl", "target": "kubectl"}]
    assert declaration.headers["auto-aliases"] == ["microk8s.kubectl"]
    assert declaration.headers["plugs"] == {
        "kubernetes-support": {"allow-installation": "true"},
        "network-control": {"allow-auto-connection": {"slot-snap-type": ["core"]}},
    }
    assert declaration.text("plugs") is None  # not plain text
    assert revision.text("snap-size") == "186716160"


def test_snap_assertions_pick_the_declaration_and_revision() -> None:
    found = SnapAssertions.parse(REAL_FORMAT, "microk8s_7394.assert")
    assert found.name == "microk8s"
    assert found.snap_id == "EaXqgt1lyCaxKaQCU349mlodBkDCXRcg"
    assert found.publisher_id == "canonical"
    assert found.revision == 7394
    assert found.size == 186716160
    assert found.sha3_384 == "Wr_HvCoJphL4eYfOBwY0oJMtMYkaYaDsWY6B5uxhbJ8A8F_2JwcMv2ywSZscM01N"
    assert sha3_384_b64(bytes.fromhex(found.sha3_384_hex)) == found.sha3_384
    assert len(found.sha3_384_hex) == 96
    assert len(found.assertions) == 4


def test_multiline_text_header_and_blank_lines_between_assertions() -> None:
    text = ("type: serial\nauthority-id: canonical\ndevice-key:\n    AcbBTQRWhcGAARAA\n"
            "    5nLR8gjDXNh3\nsign-key-sha3-384: abc\n\nAXNpZw==\n\n\n\n"
            "type: account\nauthority-id: canonical\nsign-key-sha3-384: abc\n\nAXNpZw==")
    serial, account = parse_assertions(text, "x.assert")
    assert serial.headers["device-key"] == "AcbBTQRWhcGAARAA\n5nLR8gjDXNh3"
    assert account == Assertion("account", {"type": "account", "authority-id": "canonical",
                                            "sign-key-sha3-384": "abc"}, b"", "AXNpZw==")


def test_generated_assertions_parse_to_what_was_written(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "core20", 2105, size=4096)
    found = SnapAssertions.read(snap.assert_path)
    assert (found.name, found.revision, found.size, found.sha3_384, found.snap_id) == (
        "core20", 2105, 4096, snap.sha3_384, snap.snap_id)
    assert found.source == str(snap.assert_path)


def _replace(old: str, new: str) -> str:
    assert old in REAL_FORMAT
    return REAL_FORMAT.replace(old, new, 1)


_REVISION_STANZA = REAL_FORMAT[REAL_FORMAT.index("type: snap-revision"):]

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "holds no assertions"),
    "blank lines only": (b"\n\n\n", "holds no assertions"),
    "binary (a .snap given as .assert)": (b"hsqs\x00\x01\xff\xfe\n\n\x00\x02\x03",
                                          "not UTF-8"),
    "captive portal page": (b"<!DOCTYPE html>\n<html><body>Log in</body></html>\n\n",
                            "has no ':'"),
    "headers only": (b"type: snap-revision\nsign-key-sha3-384: x\n", "no blank line"),
    "no signature": (b"type: snap-revision\nsign-key-sha3-384: x\n\n", "no signature"),
    "header without space": (b"type:snap-revision\nsign-key-sha3-384: x\n\nAXNpZw==",
                             "needs a space"),
    "bad header name": (b"type: a\nSnap_Size: 1\nsign-key-sha3-384: x\n\nAXNpZw==",
                        "invalid header name"),
    "repeated header": (b"type: a\ntype: b\nsign-key-sha3-384: x\n\nAXNpZw==", "repeated"),
    "no type": (b"authority-id: canonical\nsign-key-sha3-384: x\n\nAXNpZw==", "no `type`"),
    "no signing key": (b"type: account\n\nAXNpZw==", "sign-key-sha3-384"),
    "truncated body": (REAL_FORMAT[:REAL_FORMAT.index("pet8oV84")].encode(), "truncated"),
    "body longer than body-length": (_replace("body-length: 717", "body-length: 700").encode(),
                                     "longer than body-length"),
    "body-length not a number": (_replace("body-length: 717", "body-length: 7x").encode(),
                                 "non-negative integer"),
    "missing blank line between assertions": (
        REAL_FORMAT.replace("XH0=\n\ntype: account\n", "XH0=\ntype: account\n").encode(),
        "signature is not base64"),
    "windows line endings": (REAL_FORMAT.replace("\n", "\r\n").encode(), "CRLF"),
    "list item outside a list": (b"type: a\nx:\n  -\nsign-key-sha3-384: x\n\nAXNpZw==",
                                 "no indented lines"),
    "no snap-revision": (REAL_FORMAT[:REAL_FORMAT.index("type: snap-revision")].encode(),
                         "holds 0 snap-revision"),
    "two snap-revisions": ((REAL_FORMAT + "\n" + _REVISION_STANZA).encode(),
                           "holds 2 snap-revision"),
    "declaration of another snap": (
        _replace("snap-id: EaXqgt1lyCaxKaQCU349mlodBkDCXRcg\naliases",
                 "snap-id: DLqre5XGLbDqg9jPtiAhRRjDuPVa5X1q\naliases").encode(),
        "no snap-declaration for snap-id EaXqgt1lyCaxKaQCU349mlodBkDCXRcg"),
    "short digest": (_replace("snap-sha3-384: Wr_Hv", "snap-sha3-384: Wr").encode(),
                     "not 64 characters"),
    "digest in hex": (_replace(
        "snap-sha3-384: Wr_HvCoJphL4eYfOBwY0oJMtMYkaYaDsWY6B5uxhbJ8A8F_2JwcMv2ywSZscM01N",
        "snap-sha3-384: " + "ab" * 48).encode(), "not 64 characters"),
    "size not a number": (_replace("snap-size: 186716160", "snap-size: 186,716,160").encode(),
                          "`snap-size` must be a non-negative integer"),
    "revision zero": (_replace("snap-revision: 7394", "snap-revision: 0").encode(),
                      "snap-revision must be at least 1"),
    "no snap-name": (_replace("snap-name: microk8s\n", "").encode(), "no `snap-name`"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_garbage_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    data, expected = BAD_FILES[case]
    path = tmp_path / "microk8s.assert"
    path.write_bytes(data)
    with pytest.raises(SnapError) as caught:
        SnapAssertions.read(path)
    assert str(path) in caught.value.message
    assert expected in caught.value.message
    assert caught.value.hint


def test_a_missing_or_huge_assert_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapError, match="does not exist"):
        SnapAssertions.read(tmp_path / "nope.assert")
    big = tmp_path / "big.assert"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    with pytest.raises(SnapError, match="far too large"):
        SnapAssertions.read(big)


def test_digest_forms_convert_both_ways() -> None:
    import hashlib

    digest = hashlib.sha3_384(b"x").digest()
    assert sha3_384_b64(digest) == "Wr_HvCoJphL4eYfOBwY0oJMtMYkaYaDsWY6B5uxhbJ8A8F_2JwcMv2ywSZscM01N"
    assert sha3_384_hex(sha3_384_b64(digest)) == digest.hex()


def test_assertion_text_helper_matches_the_real_layout() -> None:
    """The generator the other tests use writes the same layout as REAL_FORMAT."""
    text = assertion_text("microk8s", 7394, 186716160,
                          "Wr_HvCoJphL4eYfOBwY0oJMtMYkaYaDsWY6B5uxhbJ8A8F_2JwcMv2ywSZscM01N")
    ours = parse_assertions(text, "generated")
    real = parse_assertions(REAL_FORMAT, "real")
    assert [a.type for a in ours] == [a.type for a in real]
    assert ours[-1].headers == real[-1].headers
    assert len(ours[0].body) == len(real[0].body) == 717
