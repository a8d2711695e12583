"""`gapkit cluster status`: per node, reachable, MicroK8s version, images present, Ready.

Read-only. Every node is asked at once over SSH (`microk8s version`, `microk8s ctr image ls -q`,
whose wrapper already adds `--namespace k8s.io`); Ready comes from `microk8s kubectl get nodes
-o json` on the first control-plane node that answers, matched to the inventory by node name,
else by address (InternalIP / Hostname).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gapkit.cluster.inventory import Inventory, NodeSpec
from gapkit.cluster.runners import SSHRunner, connected, fan_out
from gapkit.errors import GapkitError

_VERSION = re.compile(r"MicroK8s\s+(v?\d+\.\d+[^\s]*)(?:\s+revision\s+(\d+))?")


@dataclass
class NodeStatus:
    name: str
    address: str
    role: str
    reachable: bool = False
    error: str = ""
    version: str | None = None
    revision: str | None = None
    images: int | None = None
    #: With a bundle: how many of its images the node holds, and which are missing.
    bundle_present: int | None = None
    bundle_total: int | None = None
    missing: list[str] = field(default_factory=list)
    ready: bool | None = None
    ready_detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "role": self.role,
                "reachable": self.reachable, "error": self.error or None,
                "microk8s": self.version, "revision": self.revision, "images": self.images,
                "bundle": None if self.bundle_total is None else
                {"present": self.bundle_present, "total": self.bundle_total,
                 "missing": self.missing},
                "ready": self.ready, "ready_detail": self.ready_detail or None}


@dataclass
class ClusterStatus:
    nodes: list[NodeStatus]
    #: Which node answered `kubectl get nodes`.
    asked: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(n.reachable and n.ready for n in self.nodes)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "asked": self.asked, "nodes": [n.to_json() for n in self.nodes],
                "notes": self.notes}


def parse_version(text: str) -> tuple[str | None, str | None]:
    """`MicroK8s v1.32.3 revision 7964` -> ("v1.32.3", "7964")."""
    match = _VERSION.search(text)
    return (match[1], match[2]) if match else (None, None)


def parse_image_list(text: str) -> list[str]:
    """`ctr image ls -q` lines, without the bare `sha256:...` ids containerd also lists."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("sha256:")]


@dataclass(frozen=True)
class KubeNode:
    name: str
    addresses: tuple[str, ...]
    ready: bool
    reason: str


def parse_kube_nodes(text: str) -> list[KubeNode]:
    """`kubectl get nodes -o json` -> name, addresses, Ready and why."""
    data: Any = json.loads(text)
    out = []
    for item in data.get("items", []):
        name = str(item.get("metadata", {}).get("name", ""))
        status = item.get("status", {})
        addresses = tuple(str(a.get("address", "")) for a in status.get("addresses", []))
        ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
        is_ready = bool(ready and ready.get("status") == "True")
        reason = "" if ready is None else str(ready.get("reason") or ready.get("message") or "")
        out.append(KubeNode(name, addresses, is_ready, reason if not is_ready else ""))
    return out


def match_ready(status: NodeStatus, kube: Sequence[KubeNode]) -> None:
    found = next((k for k in kube if k.name == status.name), None) or \
        next((k for k in kube if status.address in k.addresses), None)
    if found is None:
        status.ready = False
        status.ready_detail = "not in the cluster (`kubectl get nodes` does not list it)"
        return
    status.ready = found.ready
    status.ready_detail = "Ready" if found.ready else f"NotReady{': ' + found.reason if found.reason else ''}"


async def _node_facts(runner: SSHRunner, status: NodeStatus, bundle_refs: Sequence[str] | None,
                      timeout: float) -> None:
    version = await runner.run(["microk8s", "version"], timeout=timeout)
    if version.returncode != 0:
        status.version = None
        status.error = "MicroK8s is not installed" if version.returncode == 127 else \
            f"`microk8s version` failed: {(version.stderr or version.stdout).strip()[-200:]}"
        return
    status.version, status.revision = parse_version(version.stdout)
    images = await runner.run(["microk8s", "ctr", "image", "ls", "-q"], timeout=timeout)
    if images.returncode != 0:
        status.error = f"`microk8s ctr image ls` failed: {(images.stderr or images.stdout).strip()[-200:]}"
        return
    names = parse_image_list(images.stdout)
    status.images = len(names)
    if bundle_refs is not None:
        have = set(names)
        status.missing = [ref for ref in bundle_refs if ref not in have]
        status.bundle_total = len(bundle_refs)
        status.bundle_present = len(bundle_refs) - len(status.missing)


async def cluster_status(inventory: Inventory, bundle: Path | None = None, jobs: int = 10,
                         timeout: float = 60.0) -> ClusterStatus:
    """Ask every node at once; nodes that do not answer are reported, not raised."""
    bundle_refs: list[str] | None = None
    if bundle is not None:
        from gapkit.node.check import read_bundle_facts

        bundle_facts = await read_bundle_facts(bundle)
        bundle_refs = [str(ref) for ref, _ in bundle_facts.images]
    statuses = {n.name: NodeStatus(n.name, n.address, n.role) for n in inventory.nodes}
    report = ClusterStatus(list(statuses.values()))
    targets = [inventory.target(n) for n in inventory.nodes]
    async with connected(targets, jobs) as (runners, errors):
        for name, error in errors.items():
            statuses[name].error = error.message
        for name, runner in runners.items():
            statuses[name].reachable = True
            report.notes += runner.notes

        async def facts(runner: SSHRunner) -> None:
            await _node_facts(runner, statuses[runner.name], bundle_refs, timeout)

        done = await fan_out(runners.values(), facts, jobs, name=lambda r: r.name)
        for result in done.errors:
            assert result.error is not None
            statuses[result.node].error = result.error.message
        kube, asked, why = await _kube_nodes(inventory.control_planes, runners, statuses, timeout)
    report.asked = asked
    for status in report.nodes:
        if kube is not None:
            match_ready(status, kube)
        else:
            status.ready = None
            status.ready_detail = why
    return report


async def _kube_nodes(control_planes: Sequence[NodeSpec], runners: dict[str, SSHRunner],
                      statuses: dict[str, NodeStatus], timeout: float
                      ) -> tuple[list[KubeNode] | None, str | None, str]:
    """`kubectl get nodes` from the first control-plane node that can answer."""
    why = "no control-plane node answered"
    for node in control_planes:
        runner = runners.get(node.name)
        if runner is None or statuses[node.name].version is None:
            continue
        try:
            result = await runner.run(["microk8s", "kubectl", "get", "nodes", "-o", "json"],
                                      timeout=timeout)
        except GapkitError as exc:
            why = exc.message
            continue
        if result.returncode != 0:
            why = f"{node.name}: `microk8s kubectl get nodes` failed: " \
                  f"{(result.stderr or result.stdout).strip()[-200:]}"
            continue
        try:
            return parse_kube_nodes(result.stdout), node.name, ""
        except (ValueError, AttributeError) as exc:
            why = f"{node.name}: `kubectl get nodes -o json` did not print JSON ({exc})"
    return None, None, why
