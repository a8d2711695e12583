from __future__ import annotations

from pathlib import Path

import pytest

from gapkit.bundle.spec import bundle_flags, load_spec
from gapkit.errors import UsageError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_spec_file_with_relative_paths_and_flags_on_top(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REG_PASSWORD", "hunter2")
    spec_file = write(tmp_path / "gapkit.yaml", """\
microk8s: "1.32"
addons: [dns]
images: [nginx:1.27]
images_from: [lists/extra.txt]
platforms: [linux/amd64]
snaps: {from: snaps}
registries:
  mirrors: {docker.io: [http://10.0.0.5:5000]}
  creds: {registry.example: "ci:${REG_PASSWORD}"}
  retries: 2
  timeout: 7.5
""")
    spec = load_spec(spec_file, bundle_flags(addons="ingress,metallb", images=["busybox"],
                                             platforms=["linux/arm64"], no_snapd=True,
                                             timeout=3))
    assert spec.microk8s == "1.32"
    assert spec.addons == ["dns", "ingress", "metallb"]
    assert spec.images == ["nginx:1.27", "busybox"]
    assert spec.images_from == [tmp_path / "lists" / "extra.txt"]
    assert spec.snaps.from_ == tmp_path / "snaps"
    assert spec.snaps.snapd is False
    assert [str(p) for p in spec.platform_set()] == ["linux/amd64", "linux/arm64"]
    settings = spec.registries.settings()
    assert settings.mirrors == {"docker.io": ["http://10.0.0.5:5000"]}
    assert settings.hosts["registry.example"].credentials == ("ci", "hunter2")
    assert (settings.retries, settings.timeout) == (2, 3)
    store = settings.store()
    assert (store.retries, store.timeout) == (2, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('microk8s: "1.32"\nimagez: [nginx]\n', "gapkit.yaml:2: imagez: unknown key"),
        ('images:\n  - nginx\n  - Bad/Name\n', "gapkit.yaml:3: images[1]: 'Bad/Name'"),
        ("platforms: [linux/amd64, linux]\n", "gapkit.yaml:1: platforms[1]: 'linux' is not a platform"),
        ("microk8s: 1.30\n", "gapkit.yaml:1: microk8s: write the release in quotes"),
        ("images: [nginx\n", "gapkit.yaml:2: not valid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("snaps:\n  enabled: maybe\n", "gapkit.yaml:2: snaps.enabled"),
        ("registries:\n  retries: -1\n", "gapkit.yaml:2: registries.retries"),
        ('registries:\n  creds: {r.example: "u:${NOPE_NOT_SET}"}\n', "NOPE_NOT_SET is not set"),
    ],
)
def test_spec_errors_name_the_file_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        load_spec(write(tmp_path / "gapkit.yaml", text), {})
    assert message in err.value.message


def test_an_empty_bundle_is_refused_with_what_to_add() -> None:
    with pytest.raises(UsageError, match="would be empty") as err:
        load_spec(None, {}).check()
    assert err.value.hint and "--microk8s" in err.value.hint


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(UsageError, match="--platforms"):
        load_spec(None, bundle_flags(platforms=["nope"]))
    with pytest.raises(UsageError, match="--mirror"):
        bundle_flags(mirrors=["docker.io"])
