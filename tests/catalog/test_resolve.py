"""`resolve_images`: one normalised, de-duplicated list with every source of every image."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gapkit.catalog import ImageListError, release, resolve_images
from gapkit.errors import UsageError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_an_image_named_many_ways_is_listed_once_with_every_source(tmp_path: Path) -> None:
    manifest = write(tmp_path / "k8s" / "cni-debug.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: debug}
        spec:
          containers:
            - {name: cni, image: "calico/cni:v3.28.1"}
            - {name: sandbox, image: "registry.k8s.io/pause:3.10"}
        """)
    listed = write(tmp_path / "images.txt", """
        # extra images
        docker.io/calico/cni:v3.28.1

        nginx   # the web tier
        """)
    result = resolve_images("1.32", manifests=[tmp_path / "k8s"],
                            images=["index.docker.io/calico/cni:v3.28.1", "nginx:latest"],
                            images_from=[listed])
    by_ref = {str(image.reference): image.sources for image in result}
    assert by_ref["docker.io/calico/cni:v3.28.1"] == (
        "core:calico (microk8s 1.32)",
        f"manifest:{manifest}#1 Pod/debug container cni",
        "--image",
        f"file:{listed}:2",
    )
    assert by_ref["registry.k8s.io/pause:3.10"] == (
        "core:pause (microk8s 1.32)", f"manifest:{manifest}#1 Pod/debug container sandbox")
    assert by_ref["docker.io/library/nginx:latest"] == ("--image", f"file:{listed}:4")
    assert len(result) == len(by_ref) == 6  # 5 core images + nginx
    assert [str(r) for r in result.references] == sorted(by_ref)


def test_addons_bring_the_addons_they_enable_and_say_which(tmp_path: Path) -> None:
    result = resolve_images("1.32", addons=["registry,dns"])
    by_ref = {str(image.reference): image.sources for image in result}
    assert by_ref["docker.io/library/registry:2.8.1"] == ("addon:registry (microk8s 1.32)",)
    assert by_ref["docker.io/cdkbot/hostpath-provisioner:1.5.0"] == (
        "addon:hostpath-storage (microk8s 1.32, enabled by registry)",)
    assert by_ref["docker.io/coredns/coredns:1.10.1"] == ("core:coredns (microk8s 1.32)",
                                                          "addon:dns (microk8s 1.32)")
    assert result.addons == (("registry", None), ("dns", None), ("hostpath-storage", "registry"))


def test_without_a_release_only_the_images_named_are_listed() -> None:
    result = resolve_images(None, images=["nginx"])
    assert [str(r) for r in result.references] == ["docker.io/library/nginx:latest"]
    assert result.release is None and result.snap_base is None and result.registries == ("docker.io",)


def test_asking_for_nothing_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no images asked for"):
        resolve_images()


def test_addons_without_a_release_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="addons were named without a MicroK8s release"):
        resolve_images(None, addons=["dns"])


def test_every_bad_line_of_an_images_file_is_reported_by_file_and_line(tmp_path: Path) -> None:
    listed = write(tmp_path / "images.txt", """
        registry.k8s.io/pause:3.10
        # a comment
        Nginx:1.27
        quay.io/metallb/speaker:
        calico/node:v3.29.3  # fine
        registry.k8s.io/pause 3.10
        """)
    with pytest.raises(ImageListError) as caught:
        resolve_images(None, images_from=[listed], images=["UPPER/case"])
    error = caught.value
    assert error.exit_code == 2
    assert [p.message.split(":")[0] for p in error.problems[:3]] == ["--image", str(listed), str(listed)]
    located = [p.message for p in error.problems if p.message.startswith(str(listed))]
    assert [m[len(str(listed)):].split(":")[1] for m in located] == ["3", "4", "6"]
    assert error.message.startswith("4 problems in the images to list:\n")
    expected = f"{listed}:4: 'quay.io/metallb/speaker:' is not an image reference: the tag is empty"
    assert expected in error.message


def test_an_images_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match=r"missing\.txt: cannot read it: No such file or directory"):
        resolve_images(None, images_from=[tmp_path / "missing.txt"])


def test_manifest_warnings_are_kept_and_bad_images_stop_the_list(tmp_path: Path) -> None:
    write(tmp_path / "m" / "notes.yaml", "just: a note\n")
    assert resolve_images(None, manifests=[tmp_path / "m"]).warnings == (
        f"{tmp_path / 'm' / 'notes.yaml'}: skipped, not a Kubernetes manifest "
        "(no document has apiVersion and kind)",)
    write(tmp_path / "m" / "pod.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec: {containers: [{name: c, image: "bad image"}]}
        """)
    with pytest.raises(ImageListError, match=r"pod.yaml#1 Pod/p container c: 'bad image'"):
        resolve_images(None, manifests=[tmp_path / "m"])


def test_json_form_names_release_addons_images_and_registries() -> None:
    data = resolve_images("1.32-strict/stable", addons=["ingress"], images=["nginx"]).to_json()
    assert data["microk8s"] == {"release": "1.32-strict", "channel": "1.32-strict/stable",
                                "snap_base": "core20", "confinement": "strict"}
    assert data["addons"] == [{"name": "ingress", "enabled_by": None}]
    assert data["registries"] == ["docker.io", "registry.k8s.io"]
    assert data["warnings"] == [] and data["notes"] == []
    nginx = next(i for i in data["images"] if i["repository"] == "library/nginx")
    assert nginx == {"reference": "docker.io/library/nginx:latest", "registry": "docker.io",
                     "repository": "library/nginx", "tag": "latest", "digest": None, "sources": ["--image"]}


def test_a_release_value_is_accepted_and_notes_come_with_the_addons() -> None:
    result = resolve_images(release("1.35"), addons=["ingress"])
    assert result.snap_base == "core22" and str(result.channel) == "1.35/stable"
    assert any("Gateway API" in note for note in result.notes)
    assert str(resolve_images("latest").channel) == "latest/stable"
