"""`gapkit images list` and `gapkit images releases`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gapkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gapkit", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env=env)


def listed(*args: str) -> dict[str, list[str]]:
    result = gapkit("images", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return {image["reference"]: image["sources"] for image in json.loads(result.stdout)["images"]}


def test_images_list_1_27_includes_registry_k8s_io_pause_3_7_and_the_three_calico_images() -> None:
    images = listed("--microk8s", "1.27")
    assert "registry.k8s.io/pause:3.7" in images
    for calico in ("docker.io/calico/cni:v3.25.0", "docker.io/calico/node:v3.25.0",
                   "docker.io/calico/kube-controllers:v3.25.0"):
        assert images[calico] == ["core:calico (microk8s 1.27)"]


def test_images_list_1_24_gives_k8s_gcr_io_pause_3_1_as_its_containerd_template_names_it() -> None:
    images = listed("--microk8s", "1.24")
    assert [ref for ref in images if ref.endswith(("/pause:3.1", "/pause:3.7", "/pause:3.10"))] == [
        "k8s.gcr.io/pause:3.1"]


def test_the_table_shows_each_image_once_with_its_sources_and_the_summary_on_stderr() -> None:
    result = gapkit("images", "list", "--microk8s", "1.32", "--addons", "registry",
                    "--image", "docker.io/library/registry:2.8.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "SOURCES"]
    row = lines.index(next(line for line in lines if "docker.io/library/registry:2.8.1" in line))
    assert "addon:registry (microk8s 1.32)" in lines[row]
    assert lines[row + 1].strip() == "--image"
    assert sum("docker.io/library/registry:2.8.1" in line for line in lines) == 1
    assert "hostpath-storage (microk8s 1.32, enabled by registry)" in result.stdout
    assert result.stderr.strip() == (
        "8 image(s) from docker.io, registry.k8s.io; MicroK8s 1.32 needs the core20 base snap")


def test_quiet_prints_one_reference_a_line() -> None:
    result = gapkit("images", "list", "--microk8s", "1.24", "-q")
    assert result.stdout.splitlines() == [
        "docker.io/calico/cni:v3.21.4", "docker.io/calico/kube-controllers:v3.21.4",
        "docker.io/calico/node:v3.21.4", "docker.io/calico/pod2daemon-flexvol:v3.21.4",
        "k8s.gcr.io/pause:3.1"]


def test_json_shape() -> None:
    result = gapkit("images", "list", "--microk8s", "1.35", "--addons", "ingress", "--image", "nginx",
                    "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"microk8s", "addons", "images", "registries", "warnings", "notes"}
    assert data["microk8s"] == {"release": "1.35", "channel": "1.35/stable", "snap_base": "core22",
                                "confinement": "classic"}
    assert data["addons"] == [{"name": "ingress", "enabled_by": None}]
    for image in data["images"]:
        assert set(image) == {"reference", "registry", "repository", "tag", "digest", "sources"}
        assert image["sources"]
    assert {"reference": "docker.io/library/traefik:v3.6.2", "registry": "docker.io",
            "repository": "library/traefik", "tag": "v3.6.2", "digest": None,
            "sources": ["addon:ingress (microk8s 1.35)"]} in data["images"]
    assert any("Gateway API" in note for note in data["notes"])
    assert result.stderr == ""


def test_unknown_release_exits_2_listing_the_known_ones_without_a_traceback() -> None:
    result = gapkit("images", "list", "--microk8s", "1.21")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "error: '1.21' is not a MicroK8s release the catalog knows\nhint: known releases: 1.22")
    for known in ("1.25-strict", "1.24-eksd", "1.36, master, latest"):
        assert known in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_addon_exits_2_listing_the_addons_of_the_release() -> None:
    result = gapkit("images", "list", "--microk8s", "1.32", "--addons", "dns,ingres")
    assert result.returncode == 2
    assert "error: unknown MicroK8s addon 'ingres'" in result.stderr
    assert ("hint: addons known for 1.32: cert-manager, dashboard, dns, helm, helm3, hostpath-storage, "
            "ingress") in result.stderr
    assert "Traceback" not in result.stderr


def test_manifest_warnings_go_to_stderr_and_the_json_stays_clean(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(textwrap.dedent("""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec: {template: {spec: {containers: [{name: app, image: "nginx:1.27"}]}}}
        """))
    (tmp_path / "values.yaml").write_text("replicas: 3\n")
    (tmp_path / "bad.yml").write_text("a: [b\n")
    result = gapkit("images", "list", "--manifests", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [i["sources"] for i in data["images"]] == [
        [f"manifest:{tmp_path}/app.yaml#1 Deployment/web container app"]]
    assert len(data["warnings"]) == 2
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == [f"{tmp_path}/bad.yml", f"{tmp_path}/values.yaml"]


def test_a_bad_line_in_images_from_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    images = tmp_path / "images.txt"
    images.write_text("registry.k8s.io/pause:3.10\n\n# comment\nnot a reference\n")
    result = gapkit("images", "list", "--images-from", str(images))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {images}:4: 'not a reference' is not an image reference")
    assert "Traceback" not in result.stderr


def test_a_chart_without_helm_exits_2_saying_helm_is_not_installed(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: web\nversion: 0.1.0\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    result = gapkit("images", "list", "--manifests", str(chart), env={**os.environ, "PATH": str(empty)})
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: {chart}: is a Helm chart, and helm is not installed (helm is not on PATH), "
        "so its images cannot be listed\nhint: install helm 3 (https://helm.sh/docs/intro/install/)")


def test_images_releases_lists_each_release_with_its_base_snap() -> None:
    result = gapkit("images", "releases", "--json")
    assert result.returncode == 0, result.stderr
    data = {r["release"]: r for r in json.loads(result.stdout)}
    assert {name: data[name]["snap_base"] for name in ("1.26", "1.27", "1.33", "1.34", "1.36")} == {
        "1.26": "core18", "1.27": "core20", "1.33": "core20", "1.34": "core22", "1.36": "core22"}
    assert data["1.36"]["aliases"] == ["master", "latest"]
    table = gapkit("images", "releases")
    assert table.returncode == 0
    assert any(line.split()[:3] == ["1.30-strict", "core20", "strict"] for line in table.stdout.splitlines())
