"""Image discovery in a folder of real-looking manifests, and in Helm charts."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from gapkit.catalog import discover


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    """A repository of deployment files, written the way people write them."""
    root = tmp_path / "deploy"
    write(root / "web" / "web.yaml", """
        # the web tier
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec: {ports: [{port: 80}]}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: web
          labels: {app: web}
        spec:
          replicas: 2
          template:
            spec:
              initContainers:
                - name: migrate
                  image: ghcr.io/example/migrate:2.1
              containers:
                - name: app
                  image: nginx:1.27
                - name: metrics
                  image: quay.io/prometheus/nginx-exporter@sha256:DIGEST
              ephemeralContainers:
                - name: debug
                  image: busybox
        ---
        ---
        """.replace("DIGEST", "a" * 64))
    write(root / "jobs" / "backup.yml", """
        apiVersion: batch/v1
        kind: CronJob
        metadata: {name: backup}
        spec:
          schedule: "0 3 * * *"
          jobTemplate:
            spec:
              template:
                spec:
                  restartPolicy: OnFailure
                  containers:
                    - name: dump
                      image: postgres:16
        """)
    write(root / "jobs" / "deep" / "workloads.yaml", """
        apiVersion: batch/v1
        kind: Job
        metadata: {name: once}
        spec: {template: {spec: {containers: [{name: run, image: "alpine:3.20"}]}}}
        ---
        apiVersion: apps/v1
        kind: StatefulSet
        metadata: {name: db}
        spec: {template: {spec: {containers: [{name: db, image: "postgres:16"}]}}}
        ---
        apiVersion: apps/v1
        kind: DaemonSet
        metadata: {name: agent}
        spec: {template: {spec: {containers: [{name: agent, image: "registry.example:5000/ops/agent:1"}]}}}
        ---
        apiVersion: apps/v1
        kind: ReplicaSet
        metadata: {name: rs}
        spec: {template: {spec: {containers: [{name: c, image: "redis:7"}]}}}
        ---
        apiVersion: v1
        kind: ReplicationController
        metadata: {name: rc}
        spec: {template: {spec: {containers: [{name: c, image: "memcached:1.6"}]}}}
        """)
    write(root / "exported.yaml", """
        apiVersion: v1
        kind: List
        items:
          - apiVersion: v1
            kind: Pod
            metadata: {name: solo}
            spec: {containers: [{name: main, image: "docker.io/library/httpd:2.4"}]}
          - apiVersion: v1
            kind: ConfigMap
            metadata: {name: settings}
            data: {image: "not-an-image-field"}
        """)
    (root / "pod.json").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jsonpod"},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/echoserver:1.10"}]}}))
    write(root / "mixed.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: mixed}
        spec: {containers: [{name: c, image: "nginx:1.27"}]}
        ---
        just: some settings
        """)
    write(root / "broken.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: [unclosed
        """)
    write(root / "ci" / "workflow.yml", """
        name: ci
        on: push
        jobs: {build: {runs-on: ubuntu-latest}}
        """)
    (root / "README.md").write_text("# not read: not a manifest suffix\nimage: nope:1\n")
    write(root / ".git" / "hidden.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: hidden}
        spec: {containers: [{name: c, image: "hidden:1"}]}
        """)
    return root


def test_a_folder_of_manifests_gives_every_container_image_with_its_place(manifests: Path) -> None:
    found = discover([manifests])
    got = [(f.location.replace(str(manifests), "deploy"), str(f.reference)) for f in found.images]
    assert got == [
        ("deploy/exported.yaml#1 items[0] Pod/solo container main", "docker.io/library/httpd:2.4"),
        ("deploy/jobs/backup.yml#1 CronJob/backup container dump", "docker.io/library/postgres:16"),
        ("deploy/jobs/deep/workloads.yaml#1 Job/once container run", "docker.io/library/alpine:3.20"),
        ("deploy/jobs/deep/workloads.yaml#2 StatefulSet/db container db", "docker.io/library/postgres:16"),
        ("deploy/jobs/deep/workloads.yaml#3 DaemonSet/agent container agent",
         "registry.example:5000/ops/agent:1"),
        ("deploy/jobs/deep/workloads.yaml#4 ReplicaSet/rs container c", "docker.io/library/redis:7"),
        ("deploy/jobs/deep/workloads.yaml#5 ReplicationController/rc container c",
         "docker.io/library/memcached:1.6"),
        ("deploy/mixed.yaml#1 Pod/mixed container c", "docker.io/library/nginx:1.27"),
        ("deploy/pod.json#1 Pod/jsonpod container c", "registry.k8s.io/echoserver:1.10"),
        ("deploy/web/web.yaml#2 Deployment/web container app", "docker.io/library/nginx:1.27"),
        ("deploy/web/web.yaml#2 Deployment/web container metrics",
         "quay.io/prometheus/nginx-exporter@sha256:" + "a" * 64),
        ("deploy/web/web.yaml#2 Deployment/web initContainer migrate", "ghcr.io/example/migrate:2.1"),
        ("deploy/web/web.yaml#2 Deployment/web ephemeralContainer debug", "docker.io/library/busybox:latest"),
    ]
    assert found.errors == []


def test_files_that_are_not_yaml_or_not_kubernetes_are_warnings_naming_them(manifests: Path) -> None:
    warnings = [str(w).replace(str(manifests), "deploy") for w in discover([manifests]).warnings]
    assert len(warnings) == 3
    assert warnings[0].startswith("deploy/broken.yaml: not valid YAML (line ")
    assert warnings[1] == "deploy/ci/workflow.yml: skipped, not a Kubernetes manifest " \
                          "(no document has apiVersion and kind)"
    assert warnings[2] == "deploy/mixed.yaml: document(s) #2 skipped, not Kubernetes objects"


def test_a_file_named_directly_is_read_whatever_its_name(tmp_path: Path) -> None:
    path = write(tmp_path / "rendered.out", """
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec: {containers: [{name: c, image: "nginx:1.27"}]}
        """)
    assert [str(f.reference) for f in discover([path]).images] == ["docker.io/library/nginx:1.27"]


def test_a_bad_image_is_an_error_naming_file_document_and_container(tmp_path: Path) -> None:
    path = write(tmp_path / "app.yaml", """
        apiVersion: v1
        kind: Service
        metadata: {name: app}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app}
        spec:
          template:
            spec:
              containers:
                - name: good
                  image: nginx:1.27
                - name: templated
                  image: "registry.example/app:{{ .Values.tag }}"
                - name: nameless
        """)
    found = discover([path])
    assert [str(f.reference) for f in found.images] == ["docker.io/library/nginx:1.27"]
    messages = [e.message for e in found.errors]
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}#2 Deployment/app container templated: ")
    assert "not an image reference" in messages[0]
    assert messages[1] == f"{path}#2 Deployment/app container nameless: no image"


def test_a_kind_gapkit_does_not_know_is_read_where_a_pod_template_lives(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout.yaml", """
        apiVersion: argoproj.io/v1alpha1
        kind: Rollout
        metadata: {name: canary}
        spec:
          template:
            spec:
              containers: [{name: app, image: "ghcr.io/example/app:3"}]
        ---
        apiVersion: example.com/v1
        kind: Widget
        metadata: {name: w}
        spec: {template: "not a pod"}
        """)
    found = discover([path])
    assert [(f.location, str(f.reference)) for f in found.images] == [
        (f"{path}#1 Rollout/canary container app", "ghcr.io/example/app:3")]
    assert found.warnings == [] and found.errors == []


def test_a_typed_list_without_item_kinds_is_read_as_its_kind(tmp_path: Path) -> None:
    path = tmp_path / "deployments.json"
    path.write_text(json.dumps({"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [
        {"metadata": {"name": "api"},
         "spec": {"template": {"spec": {"containers": [{"name": "api", "image": "ghcr.io/x/api:1"}]}}}}]}))
    assert [f.location for f in discover([path]).images] == [
        f"{path}#1 items[0] Deployment/api container api"]


def test_a_folder_with_nothing_to_read_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    assert [str(w) for w in discover([tmp_path]).warnings] == [
        f"{tmp_path}: no .yaml, .yml or .json file or Helm chart in it"]


def test_a_path_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    found = discover([tmp_path / "nowhere"])
    assert [e.message for e in found.errors] == [f"{tmp_path / 'nowhere'}: no such file or folder"]


def test_binary_and_empty_files_are_warnings_and_symlink_loops_end(tmp_path: Path) -> None:
    (tmp_path / "blob.yaml").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "empty.yml").write_text("")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    found = discover([tmp_path])
    assert [str(w) for w in found.warnings] == [f"{tmp_path}/blob.yaml: skipped, not a text file",
                                               f"{tmp_path}/empty.yml: skipped, it holds no document"]


def write_chart(root: Path) -> Path:
    write(root / "Chart.yaml", """
        apiVersion: v2
        name: web
        version: 0.1.0
        """)
    write(root / "values.yaml", """
        image: {repository: ghcr.io/example/web, tag: "1.2.3"}
        """)
    write(root / "templates" / "deployment.yaml", """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: {{ .Release.Name }}-web}
        spec:
          template:
            spec:
              containers:
                - name: web
                  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
        """)
    return root


def test_a_chart_without_helm_installed_is_an_error_that_says_so(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    chart = write_chart(tmp_path / "apps" / "web")
    write(tmp_path / "apps" / "plain.yaml", """
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec: {containers: [{name: c, image: "nginx:1.27"}]}
        """)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    found = discover([tmp_path / "apps"])
    # the chart's templates are not read as plain YAML
    assert [str(f.reference) for f in found.images] == ["docker.io/library/nginx:1.27"]
    (error,) = found.errors
    assert error.message == (f"{chart}: is a Helm chart, and helm is not installed (helm is not on PATH), "
                             "so its images cannot be listed")
    assert error.hint is not None and error.hint.startswith("install helm 3 (https://helm.sh/docs/intro/install/)")
    assert f"helm template NAME {chart} > web.yaml" in error.hint


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed")
def test_a_chart_is_rendered_with_helm_template(tmp_path: Path) -> None:
    chart = write_chart(tmp_path / "web")
    found = discover([chart])
    assert [(f.source, str(f.reference)) for f in found.images] == [
        (f"chart:{chart} (web/templates/deployment.yaml) Deployment/gapkit-web container web",
         "ghcr.io/example/web:1.2.3")]
