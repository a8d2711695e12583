"""The ports MicroK8s nodes open to each other, as data (from the MicroK8s docs' services-and-ports
table, cross-checked against the snap's default arguments; see data/microk8s/ports.tsv).

Only the ports other nodes must reach are here: local-only ports (10248, 1338, ...) never need
a firewall rule, and optional ones (NodePorts, ingress, the registry addon) depend on workloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from gapkit.errors import UsageError

Protocol = Literal["tcp", "udp"]


@dataclass(frozen=True, order=True)
class NodePort:
    port: int
    protocol: Protocol = "tcp"
    service: str = ""
    #: Who must reach it, as the MicroK8s docs say.
    who: str = ""

    @property
    def label(self) -> str:
        """`16443` for TCP, `4789/udp` for UDP: how the matrix and `--ports` name it."""
        return str(self.port) if self.protocol == "tcp" else f"{self.port}/{self.protocol}"

    def __str__(self) -> str:
        return self.label


APISERVER = NodePort(16443, "tcp", "kube-apiserver", "every other node, kubectl")
KUBELET = NodePort(10250, "tcp", "kubelet", "control-plane nodes (logs, exec), metrics-server")
CLUSTER_AGENT = NodePort(25000, "tcp", "cluster-agent", "joining nodes; every node for images "
                         "import and addon operations")
DQLITE = NodePort(19001, "tcp", "k8s-dqlite", "control-plane nodes (not --worker)")
ETCD = NodePort(12379, "tcp", "etcd", "nodes of a non-HA (etcd + flannel) cluster")
VXLAN = NodePort(4789, "udp", "Calico VXLAN", "every node (pod-to-pod traffic)")

#: What every node of a default (HA, dqlite + Calico) cluster must reach on every other node.
NODE_PORTS: tuple[NodePort, ...] = (APISERVER, CLUSTER_AGENT, DQLITE, KUBELET, VXLAN)
KNOWN: dict[tuple[int, Protocol], NodePort] = {
    (p.port, p.protocol): p for p in (*NODE_PORTS, ETCD)}


def node_ports(etcd: bool = False) -> tuple[NodePort, ...]:
    """The inter-node ports; with `etcd`, 12379 too (a cluster with ha-cluster disabled)."""
    if not etcd:
        return NODE_PORTS
    return (*NODE_PORTS[:-1], ETCD, NODE_PORTS[-1])


def parse_ports(texts: Iterable[str]) -> tuple[NodePort, ...]:
    """`16443,25000,4789/udp` (comma-separated, repeatable) -> ports, known ones named."""
    out: list[NodePort] = []
    for text in texts:
        for item in text.split(","):
            item = item.strip().lower()
            if not item:
                continue
            number, _, proto = item.partition("/")
            proto = proto or "tcp"
            if not number.isdigit() or not 0 < int(number) < 65536 or proto not in ("tcp", "udp"):
                raise UsageError(f"{item!r} is not a port: write PORT or PORT/udp, e.g. 4789/udp")
            protocol: Protocol = "udp" if proto == "udp" else "tcp"
            port = KNOWN.get((int(number), protocol), NodePort(int(number), protocol))
            if port not in out:
                out.append(port)
    return tuple(out)
