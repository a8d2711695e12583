"""`gapkit cluster check`: `node check` on every node at once, and the port matrix between them.

Each node's own checks (default route, advertised address, its MicroK8s ports free, disk,
snapd, MicroK8s) are `gapkit.node.check.check_node` run through that node's `SSHRunner`.

The port matrix is probed **from each node** to every other node, because what counts is the
nodes' view of each other, not the jump host's. Nodes are agentless (only `sh`, `snap`,
MicroK8s), so the probe is a shell script run on the node: a TCP connect with bash's
`/dev/tcp/ADDR/PORT` under `timeout` (bash is on every Ubuntu or Debian node), else `nc -z -w`,
all targets at once. Limits, said in the report:

- TCP only: UDP 4789 (VXLAN) cannot be told open from filtered without something answering on
  the peer, and an agentless check has nothing there; it is left out.
- Before MicroK8s runs on a peer nothing listens there: a refused connection is a WARN ("the
  packets arrive; nothing listens yet"), a timeout or no route is a FAIL. A firewall that
  REJECTs looks like "refused"; check again once MicroK8s runs.
- With `nc` only, "refused" and "filtered" are one "failed" state.
- Proxy and mirror checks are not run here: they would test the jump host's network, not the
  nodes'. Run `gapkit node check --proxy/--mirror` on a node for those.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gapkit.cluster.inventory import Inventory
from gapkit.cluster.runners import SSHRunner, connected, fan_out
from gapkit.node.check import STATUSES, Check, CheckOptions, CheckReport, Status, check_node
from gapkit.node.ports import NodePort, node_ports

#: $1 timeout, then ADDR:PORT... ; prints `TOOL` first, then `ADDR:PORT RC MESSAGE` per target.
PROBE_SCRIPT = r"""
t=$1; shift
if command -v bash >/dev/null 2>&1; then tool=bash
elif command -v nc >/dev/null 2>&1; then tool=nc
else echo "tool none"; exit 0; fi
echo "tool $tool"
for target; do
  (
    a=${target%:*}; p=${target##*:}
    if [ "$tool" = bash ]; then
      err=$(BASH_ENV= timeout "$t" bash --norc --noprofile -c 'exec 3<>"/dev/tcp/$0/$1"' \
            "$a" "$p" 2>&1 </dev/null); rc=$?
    else
      err=$(nc -z -w "$t" "$a" "$p" 2>&1 </dev/null); rc=$?
    fi
    printf '%s %s %s\n' "$target" "$rc" "$(printf %s "$err" | tr '\n' ' ')"
  ) &
done
wait
"""


@dataclass(frozen=True)
class PortResult:
    state: str  # connected | refused | timed out | unreachable | failed | error | not probed
    detail: str = ""


def classify(tool: str, rc: int, message: str) -> PortResult:
    text = message.lower()
    if rc == 0:
        return PortResult("connected")
    if rc == 124:
        return PortResult("timed out")
    if "refused" in text:
        return PortResult("refused")
    if "no route" in text or "unreachable" in text:
        return PortResult("unreachable", message.strip())
    if tool == "nc":
        return PortResult("failed", message.strip())
    return PortResult("error", message.strip() or f"exit code {rc}")


def parse_probe_output(text: str) -> tuple[str, dict[str, PortResult]]:
    tool = "none"
    found: dict[str, PortResult] = {}
    for line in text.splitlines():
        if line.startswith("tool "):
            tool = line.split()[1]
            continue
        target, _, rest = line.partition(" ")
        rc, _, message = rest.partition(" ")
        if target and rc.lstrip("-").isdigit():
            found[target] = classify(tool, int(rc), message)
    return tool, found


def _target(address: str, port: int) -> str:
    return f"{address}:{port}"


@dataclass
class NodeCheck:
    name: str
    address: str
    report: CheckReport | None = None
    error: str = ""
    #: The tool the port probe used on this node: bash, nc or none.
    probe_tool: str = ""

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "error": self.error or None,
                "probe_tool": self.probe_tool or None,
                "report": self.report.to_json() if self.report else None}


@dataclass
class ClusterCheckReport:
    nodes: list[NodeCheck]
    ports: list[NodePort]
    #: source node -> peer node -> port label -> result
    matrix: dict[str, dict[str, dict[str, PortResult]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(n.report is not None and n.report.ok for n in self.nodes)

    def counts(self) -> dict[str, int]:
        found: Counter[str] = Counter()
        for node in self.nodes:
            if node.report is None:
                found["FAIL"] += 1
            else:
                found.update(c.status for c in node.report.checks)
        return {s: found.get(s, 0) for s in STATUSES}

    def check_names(self) -> list[str]:
        """Every check's name, in the order they first appear."""
        names: dict[str, None] = {}
        for node in self.nodes:
            for check in node.report.checks if node.report else []:
                names.setdefault(check.name, None)
        return list(names)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "counts": self.counts(), "ports": [p.label for p in self.ports],
                "nodes": [n.to_json() for n in self.nodes],
                "matrix": {src: {dst: {label: {"state": r.state, "detail": r.detail or None}
                                       for label, r in row.items()}
                                 for dst, row in peers.items()}
                           for src, peers in self.matrix.items()},
                "notes": self.notes}


def peer_ports_check(peer: str, address: str, results: dict[str, PortResult],
                     tool: str) -> Check:
    """One peer's TCP ports as seen from a node."""
    detail = ", ".join(f"{label} {r.state}" for label, r in results.items())
    bad = {label: r for label, r in results.items() if r.state not in ("connected", "refused")}
    refused = [label for label, r in results.items() if r.state == "refused"]
    status: Status = "PASS"
    fixes = []
    if tool == "none":
        return Check(f"ports to {peer}", "WARN", "not probed: neither bash nor nc on this node",
                     "install bash or netcat on the node, or run `gapkit node check --peers` "
                     "there", area="ports")
    if bad:
        status = "FAIL"
        fixes.append(f"{', '.join(bad)}: {'/'.join(sorted({r.state for r in bad.values()}))}: "
                     f"open them on {peer} ({address}) and in any firewall between")
    if refused:
        status = "WARN" if status == "PASS" else status
        fixes.append(f"{', '.join(refused)}: refused (packets arrive, nothing listens yet): fine "
                     "before MicroK8s runs there; check again after")
    return Check(f"ports to {peer}", status, detail, "; ".join(fixes), area="ports")


async def _probe(runner: SSHRunner, peers: list[tuple[str, str]], ports: list[NodePort],
                 timeout: float) -> tuple[str, dict[str, dict[str, PortResult]]]:
    targets = [_target(address, p.port) for _, address in peers for p in ports]
    result = await runner.run(["sh", "-c", PROBE_SCRIPT, "sh", f"{timeout:g}", *targets],
                              timeout=timeout * 3 + 30, step="probe the peers' ports")
    tool, found = parse_probe_output(result.stdout)
    matrix = {name: {p.label: found.get(_target(address, p.port),
                                        PortResult("error", "no answer from the probe"))
                     for p in ports}
              for name, address in peers}
    return tool, matrix


async def check_cluster(inventory: Inventory, timeout: float = 2.0, jobs: int = 10,
                        etcd: bool = False) -> ClusterCheckReport:
    """Check every node at once; a node that cannot be reached is one FAIL, not an abort."""
    ports = [p for p in node_ports(etcd) if p.protocol == "tcp"]
    nodes = {n.name: NodeCheck(n.name, n.address) for n in inventory.nodes}
    report = ClusterCheckReport(list(nodes.values()), ports)
    report.notes.append("UDP 4789 (VXLAN) is not probed: nothing answers UDP on an agentless "
                        "node; run `gapkit node listen` there and `gapkit node check` to test it")
    options = CheckOptions(timeout=timeout)
    targets = [inventory.target(n) for n in inventory.nodes]
    async with connected(targets, jobs) as (runners, errors):
        for name, error in errors.items():
            nodes[name].error = error.message
        for runner in runners.values():
            report.notes += runner.notes

        # The port probes first, all nodes at once, while the nodes are quiet: a connect
        # timeout is only fair when nothing else loads the node (the node checks start
        # several programs each).
        async def probe(runner: SSHRunner) -> None:
            peers = [(n.name, n.address) for n in inventory.nodes if n.name != runner.name]
            tool, matrix = await _probe(runner, peers, ports, timeout)
            nodes[runner.name].probe_tool = tool
            report.matrix[runner.name] = matrix

        async def check(runner: SSHRunner) -> None:
            own = await check_node(options, runner)
            node = nodes[runner.name]
            for peer, address in ((n.name, n.address) for n in inventory.nodes
                                  if n.name in report.matrix.get(runner.name, {})):
                own.checks.append(peer_ports_check(peer, address,
                                                   report.matrix[runner.name][peer],
                                                   node.probe_tool))
            node.report = own

        for step in (probe, check):
            done = await fan_out(list(runners.values()), step, jobs, name=lambda r: r.name)
            for result in done.errors:
                assert result.error is not None
                nodes[result.node].error = result.error.message
                runners.pop(result.node, None)
        report.matrix = {name: report.matrix[name] for name in nodes if name in report.matrix}
    return report
