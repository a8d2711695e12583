"""Start-up: what gapkit imports before it does anything, and the plain output that spares rich.

Start-up is paid on every run (bench/ times it as `gapkit version`); these tests hold the
imports that made it slow out of the commands that do not need them. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gapkit import ui

#: Imported by commands that need them, never at start-up.
HEAVY = ("asyncio", "rich", "pydantic", "aiohttp", "yaml", "cryptography")
#: typer carries click inside (typer._click) since 0.26; before, it imported click itself.
TYPER_CARRIES_CLICK = importlib.util.find_spec("typer._click") is not None


def modules_after(*args: str) -> set[str]:
    """The top-level modules imported by the end of `gapkit ARGS`, run in a fresh interpreter."""
    script = ("import sys\nfrom gapkit.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit:\n    pass\n"
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          check=True)
    return set(done.stderr.splitlines()[-1].split())


def test_version_imports_none_of_the_heavy_modules() -> None:
    imported = modules_after("version")
    assert not imported & set(HEAVY)
    if TYPER_CARRIES_CLICK:
        assert "click" not in imported  # nor click, which gapkit does not depend on


def test_help_imports_none_of_the_heavy_modules_but_rich() -> None:
    # typer renders --help with rich; nothing else is needed to list the commands.
    assert not modules_after("--help") & (set(HEAVY) - {"rich"})


def tiny_bundle(path: Path, record: dict[str, object]) -> Path:
    """A bundle of no image: an empty OCI layout and `record` as bundle.json."""
    members = {"oci-layout": {"imageLayoutVersion": "1.0.0"},
               "index.json": {"schemaVersion": 2, "manifests": [],
                              "mediaType": "application/vnd.oci.image.index.v1+json"},
               "gapkit/bundle.json": record}
    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            data = json.dumps(value).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


RECORD: dict[str, object] = {
    "format": 1, "tool": "gapkit 0.1.0", "created": "2026-11-29T00:00:00+00:00", "microk8s": None,
    "channel": None, "snap_base": None, "platforms": ["linux/amd64"], "spec": {}, "images": [],
    "snaps": [], "blob_bytes": 0, "shared_bytes_saved": 0}


def test_verify_json_needs_neither_rich_nor_pydantic_nor_aiohttp(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b.tar", RECORD)
    imported = modules_after("bundle", "verify", "--json", str(bundle))
    assert "asyncio" in imported
    assert not imported & {"rich", "pydantic", "aiohttp"}


def test_verify_names_a_bad_bundle_json_as_the_models_do(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b.tar", {**RECORD, "blob_bytes": "many"})
    done = subprocess.run([sys.executable, "-m", "gapkit", "bundle", "verify", "--json",
                           str(bundle)], capture_output=True, text=True)
    assert done.returncode == 1
    assert json.loads(done.stdout)["problems"] == [{
        "subject": "gapkit/bundle.json",
        "message": "invalid at blob_bytes: Input should be a valid integer, unable to parse "
                   "string as an integer"}]


TRICKY = {
    "bundle": "/tmp/ü/b\u00e9 bundle.tar", "ok": False, "empty": {}, "none": [], "null": None,
    "problems": [{"subject": "docker.io/library/nginx:1.27", "message": "x" * 500},
                 {"subject": "[bold]not markup[/]", "message": ":smile: \t tab \r\n \x7f \x1b[31m"}],
    "wide": "日本語 \u2028 \u2029 \U0001f600", "numbers": [0, -1, 1.5, 1e100, 2**70, 0.1],
    "nested": {"a": {"b": [[], [{}], [1, [2, [3]]]]}},
}


def test_print_json_writes_what_rich_writes_to_a_pipe(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    for data in (TRICKY, [TRICKY, TRICKY], [], {}, "text", 3):
        ui.print_json(data)
        out = io.StringIO()
        Console(file=out, soft_wrap=True).print_json(json.dumps(data))
        assert capsys.readouterr().out == out.getvalue()


def test_print_json_colours_as_rich_does_when_forced(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    ui.stdout.cache_clear()
    try:
        ui.print_json({"ok": True})
        assert "\x1b[" in capsys.readouterr().out
    finally:
        ui.stdout.cache_clear()
