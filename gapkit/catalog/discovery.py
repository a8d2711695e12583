"""Find the images Kubernetes manifests and Helm charts run.

Every workload kind is read where its pod spec lives (Pod `spec`, CronJob
`spec.jobTemplate.spec.template.spec`, PodTemplate `template.spec`, the others
`spec.template.spec`), with `containers`, `initContainers` and `ephemeralContainers`; `List` (and
`*List`) objects are walked item by item. Kinds gapkit does not know (an Argo Rollout, an
OpenKruise CloneSet) are read at the same places when a pod spec is there.

Files: `.yaml`, `.yml` and `.json`, multi-document streams, folders walked recursively in name
order (hidden files and folders are skipped; a file named on the command line is always read). A
folder with a `Chart.yaml` is a Helm chart and is rendered with `helm template` (default values),
as is a chart archive (`.tgz`) named directly.

What cannot be read is reported, not fatal: a file that is not YAML, or holds no Kubernetes object,
is a warning. What would leave a hole in a bundle is an error: an image string that is not a valid
reference (named by file, document and container), a chart when helm is not installed, a chart
helm cannot render.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gapkit.errors import InvalidReference
from gapkit.oci.reference import Reference

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
CHART_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz")
HELM_TIMEOUT = 300.0
HELM_RELEASE_NAME = "gapkit"

#: Where each kind keeps its pod spec.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
}
_GENERIC_PATHS = (("spec", "template", "spec"), ("spec", "jobTemplate", "spec", "template", "spec"))
CONTAINER_FIELDS = (("containers", "container"), ("initContainers", "initContainer"),
                    ("ephemeralContainers", "ephemeralContainer"))

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HELM_SOURCE_RE = re.compile(r"^# Source: (.+)$", re.MULTILINE)
_DOC_SEPARATOR_RE = re.compile(r"^---[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class FoundImage:
    """An image a manifest runs, and where: `web.yaml#2 Deployment/web initContainer migrate`."""

    reference: Reference
    written: str
    location: str
    chart: bool = False

    @property
    def source(self) -> str:
        return f"{'chart' if self.chart else 'manifest'}:{self.location}"


@dataclass(frozen=True)
class Problem:
    """Something discovery could not use, with what to do about it."""

    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class Discovery:
    """What `discover` found: images in the order met, warnings (skipped input) and errors."""

    images: list[FoundImage] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)

    def extend(self, other: Discovery) -> None:
        self.images += other.images
        self.warnings += other.warnings
        self.errors += other.errors


def discover(paths: Sequence[Path | str], *, helm: str | None = None) -> Discovery:
    """Walk files, folders and charts and collect every image their workloads run.

    `helm` is the helm executable (default: `helm` on PATH). A path that does not exist is an error.
    """
    found = Discovery()
    for given in paths:
        path = Path(given)
        if path.name == "Chart.yaml" and path.is_file():
            path = path.parent
        if is_chart(path):
            found.extend(render_chart(path, helm=helm))
        elif path.is_dir():
            entries = list(_walk(path, set()))
            if not entries:
                found.warnings.append(Problem(f"{path}: no .yaml, .yml or .json file or Helm chart in it"))
            for entry in entries:
                found.extend(render_chart(entry, helm=helm) if is_chart(entry) else scan_file(entry))
        elif path.is_file():
            found.extend(scan_file(path))
        else:
            found.errors.append(Problem(f"{path}: no such file or folder",
                                        "check the path given to --manifests"))
    return found


def is_chart(path: Path) -> bool:
    """A Helm chart: a folder with `Chart.yaml`, or a chart archive."""
    if path.is_dir():
        return (path / "Chart.yaml").is_file()
    return path.is_file() and path.name.endswith(CHART_ARCHIVE_SUFFIXES)


def _walk(root: Path, seen: set[Path]) -> Iterator[Path]:
    """Manifest files and chart folders under `root`, in name order; hidden entries skipped."""
    real = root.resolve()
    if real in seen:  # a symlink loop
        return
    seen.add(real)
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_chart(entry):
                yield entry
            else:
                yield from _walk(entry, seen)
        elif entry.is_file() and entry.name.lower().endswith(MANIFEST_SUFFIXES):
            yield entry


def scan_file(path: Path) -> Discovery:
    """Images in one YAML or JSON file (any number of documents)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return Discovery(warnings=[Problem(f"{path}: skipped, not a text file")])
    except OSError as exc:
        return Discovery(errors=[Problem(f"{path}: cannot read it: {exc.strerror or exc}")])
    if path.suffix.lower() == ".json":
        try:
            documents: list[Any] = [json.loads(text)] if text.strip() else []
        except json.JSONDecodeError as exc:
            return Discovery(warnings=[Problem(f"{path}: skipped, not JSON (line {exc.lineno}: {exc.msg})")])
        return scan_documents(documents, str(path))
    documents = []
    found = Discovery()
    try:
        for document in yaml.load_all(text, Loader=_Loader):
            documents.append(document)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        read = f"; read the {len(documents)} document(s) before it" if documents else ""
        found.warnings.append(Problem(f"{path}: not valid YAML{where}: {problem}{read}"))
        if not documents:
            return found
    found.extend(scan_documents(documents, str(path)))
    return found


def scan_documents(documents: Sequence[Any], name: str, *, chart: bool = False,
                   numbered: bool = True) -> Discovery:
    """Images in parsed documents; `name` says where they came from (a file, a chart template)."""
    found = Discovery()
    kubernetes = 0
    others: list[int] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        where = f"{name}#{number}" if numbered else name
        if not _is_object(document):
            others.append(number)
            continue
        kubernetes += 1
        _scan_object(document, where, found, chart)
    if others and not kubernetes:
        found.warnings.append(Problem(f"{name}: skipped, not a Kubernetes manifest "
                                      "(no document has apiVersion and kind)"))
    elif others:
        listed = ", ".join(f"#{n}" for n in others)
        found.warnings.append(Problem(f"{name}: document(s) {listed} skipped, not Kubernetes objects"))
    elif not kubernetes and numbered:
        found.warnings.append(Problem(f"{name}: skipped, it holds no document"))
    return found


def _is_object(document: Any) -> bool:
    return (isinstance(document, Mapping) and isinstance(document.get("apiVersion"), str)
            and isinstance(document.get("kind"), str))


def _dig(value: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _scan_object(obj: Mapping[str, Any], where: str, found: Discovery, chart: bool) -> None:
    kind = str(obj["kind"])
    if kind == "List" or (kind.endswith("List") and isinstance(obj.get("items"), list)):
        for index, item in enumerate(obj.get("items") or []):
            if isinstance(item, Mapping) and "kind" not in item and kind != "List":
                item = {**item, "kind": kind[: -len("List")]}  # a typed list (DeploymentList) may omit it
            if isinstance(item, Mapping) and isinstance(item.get("kind"), str):
                _scan_object(item, f"{where} items[{index}]", found, chart)
        return
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    label = f"{kind}/{name}" if isinstance(name, str) and name else f"{kind}/<unnamed>"
    if kind in POD_SPEC_PATHS:
        spec = _dig(obj, POD_SPEC_PATHS[kind])
    else:  # a kind of a CRD that embeds a pod template, if it does
        spec = next((s for path in _GENERIC_PATHS if _has_containers(s := _dig(obj, path))), None)
    if not isinstance(spec, Mapping):
        return
    for fieldname, role in CONTAINER_FIELDS:
        containers = spec.get(fieldname)
        if not isinstance(containers, list):
            continue
        for index, container in enumerate(containers):
            if not isinstance(container, Mapping):
                continue
            cname = container.get("name")
            cname = cname if isinstance(cname, str) and cname else f"#{index + 1}"
            location = f"{where} {label} {role} {cname}"
            image = container.get("image")
            if not isinstance(image, str) or not image:
                found.errors.append(Problem(f"{location}: no image", "every container needs an image"))
                continue
            try:
                reference = Reference.parse(image)
            except InvalidReference as exc:
                found.errors.append(Problem(f"{location}: {exc.message}",
                                            exc.hint or "fix the image in the manifest"))
                continue
            found.images.append(FoundImage(reference, image, location, chart))


def _has_containers(spec: Any) -> bool:
    return isinstance(spec, Mapping) and isinstance(spec.get("containers"), list)


# --- Helm ----------------------------------------------------------------------------------------


def helm_path(helm: str | None = None) -> str | None:
    """The helm executable to use, or None when it is not installed."""
    return shutil.which(helm or "helm")


def render_chart(chart: Path, *, helm: str | None = None) -> Discovery:
    """Images of a Helm chart, rendered by `helm template` with its default values."""
    if chart.name == "Chart.yaml":
        chart = chart.parent
    executable = helm_path(helm)
    if executable is None:
        return Discovery(errors=[Problem(
            f"{chart}: is a Helm chart, and helm is not installed ({helm or 'helm'} is not on PATH), "
            "so its images cannot be listed",
            f"install helm 3 (https://helm.sh/docs/intro/install/), or render the chart where helm is: "
            f"helm template NAME {chart} > {chart.name}.yaml, and pass that file to --manifests")])
    command = [executable, "template", HELM_RELEASE_NAME, str(chart)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=HELM_TIMEOUT,
                              check=False, env={**os.environ, "HELM_NAMESPACE": "default"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Discovery(errors=[Problem(f"{chart}: helm template did not run: {exc}")])
    if done.returncode != 0:
        detail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit status {done.returncode}"
        return Discovery(errors=[Problem(
            f"{chart}: helm template failed: {detail}",
            "a chart whose dependencies are not in charts/ needs `helm dependency build` first")])
    return scan_helm_output(done.stdout, str(chart))


def scan_helm_output(text: str, chart: str) -> Discovery:
    """Images in `helm template` output, each located by the template it came from."""
    found = Discovery()
    for number, piece in enumerate(_DOC_SEPARATOR_RE.split(text), start=1):
        if not piece.strip():
            continue
        source = _HELM_SOURCE_RE.search(piece)
        name = f"{chart} ({source.group(1).strip()})" if source else f"{chart}#{number}"
        try:
            documents = list(yaml.load_all(piece, Loader=_Loader))
        except yaml.YAMLError as exc:
            found.warnings.append(Problem(f"{name}: helm rendered something that is not YAML: "
                                          f"{str(exc).splitlines()[0]}"))
            continue
        found.extend(scan_documents(documents, name, chart=True, numbered=False))
    return found
