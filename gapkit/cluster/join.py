"""Forming the cluster: one token, `add-node` on the first control-plane node, joins one at a time.

Facts this follows (data/microk8s/README.md §6):

- the token is ours (`secrets.token_hex(16)`: 32 hex characters, MicroK8s' minimum), given to
  `microk8s add-node --token T --token-ttl N`. A TTL token can be used by every joining node
  until it expires (a token without TTL is single use), so one `add-node` serves the whole run;
  N is 900 s, or 300 s per joining node when that is longer. A token that expired before the
  last join makes that join fail; the rerun asks for a new one;
- the join URL is `ADDR:PORT/TOKEN/HASH`: ADDR is the first node's **inventory address** (join
  wants a literal IP, and add-node's own choice follows the default route, which an air-gapped
  node may not have); PORT and HASH (the first 12 hex characters of the sha256 of the node's
  `server.crt`, so the joiner checks whom it talks to) are read from add-node's output;
- joins run one at a time (each control-plane join changes the dqlite membership; one at a
  time keeps each change whole and a failure points at one node), `--worker` for workers;
- a node that `microk8s kubectl get nodes` already lists (by name or address) is not joined
  again, so a rerun continues after the last node that joined;
- finally every node must be listed and Ready; a timeout names the nodes that are not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gapkit.errors import ClusterError, NodeError, NodeStepError, UsageError
from gapkit.node.install import check
from gapkit.node.plan import Runner

DEFAULT_AGENT_PORT = 25000
DEFAULT_TOKEN_TTL = 900
#: Seconds allowed per joining node when the default TTL would be too short for many nodes.
TTL_PER_JOIN = 300


def token_lifetime(token_ttl: int | None, joins: int) -> int:
    """The TTL asked: as given, else 900 s or 300 s per join when that is longer."""
    return token_ttl if token_ttl is not None else max(DEFAULT_TOKEN_TTL, TTL_PER_JOIN * joins)
KUBECTL_NODES = ("microk8s", "kubectl", "get", "nodes", "-o", "json")


@dataclass(frozen=True)
class ClusterNode:
    """A node of the inventory, as cluster up needs it."""

    name: str
    address: str
    role: str = "control-plane"

    @property
    def worker(self) -> bool:
        return self.role == "worker"


@dataclass(frozen=True)
class KubeNode:
    name: str
    addresses: tuple[str, ...]
    ready: bool


def parse_nodes(text: str) -> list[KubeNode]:
    """`kubectl get nodes -o json` -> name, addresses, Ready."""
    try:
        items = json.loads(text).get("items", [])
    except (ValueError, AttributeError):
        raise NodeError(f"`kubectl get nodes -o json` printed no JSON: {text[:300]!r}") from None
    out = []
    for item in items:
        status = item.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions", []))
        addresses = tuple(a.get("address", "") for a in status.get("addresses", []))
        out.append(KubeNode(item.get("metadata", {}).get("name", ""), addresses, ready))
    return out


async def kube_nodes(runner: Runner) -> list[KubeNode]:
    result = check(runner, await runner.run(KUBECTL_NODES), "list nodes")
    return parse_nodes(result.stdout)


def find(node: ClusterNode, listed: Sequence[KubeNode]) -> KubeNode | None:
    """The listed node that is this inventory node: same name, or one of its addresses."""
    for kube in listed:
        if kube.name == node.name or node.address in kube.addresses:
            return kube
    return None


_JOIN_LINE = re.compile(r"microk8s join (?P<host>\S+?):(?P<port>\d+)/(?P<token>[0-9a-fA-F]+)"
                        r"(?:/(?P<hash>[0-9a-fA-F]+))?")


def join_url(address: str, token: str, add_node_output: str) -> str:
    """`ADDR:PORT/TOKEN/HASH` with the port and hash add-node printed for our token.

    ADDR is the inventory's address when it is an IP (join accepts nothing else); for a host
    name, the address add-node printed first (its default-route address) is taken instead.
    """
    port, digest, printed = DEFAULT_AGENT_PORT, "", ""
    for match in _JOIN_LINE.finditer(add_node_output):
        if match["token"] == token:
            port, digest, printed = int(match["port"]), match["hash"] or "", match["host"]
            break
    host = address
    if not _is_ip(address) and printed and printed != "none":
        host = printed
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}/{token}" + (f"/{digest}" if digest else "")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass
class JoinReport:
    first: str
    #: Inventory names already in the cluster before this run (skipped).
    already: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    #: Commands as planned or run, the token shown as `<token>`.
    commands: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def render(self) -> str:
        out = [f"# cluster: first control-plane node {self.first}"]
        out += [f"# {name}: already in the cluster" for name in self.already]
        out += [f"$ [{node}] {' '.join(argv)}" for node, argv in self.commands]
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, object]:
        return {"first": self.first, "already": self.already, "joined": self.joined,
                "ready": self.ready,
                "commands": [{"node": n, "argv": list(a)} for n, a in self.commands]}


def first_control_plane(nodes: Sequence[ClusterNode]) -> ClusterNode:
    for node in nodes:
        if not node.worker:
            return node
    raise UsageError("the inventory has no control-plane node",
                     hint="give at least one node without `role: worker`")


def _shown(argv: Sequence[str], token: str) -> tuple[str, ...]:
    return tuple(a.replace(token, "<token>") for a in argv)


Progress = Callable[[str, str, str], None]


async def plan_join(nodes: Sequence[ClusterNode], runners: Mapping[str, Runner],
                    token_ttl: int | None = None) -> JoinReport:
    """What forming the cluster takes, read from the first node (when MicroK8s runs there)."""
    first = first_control_plane(nodes)
    report = JoinReport(first.name)
    listed: list[KubeNode] = []
    result = await runners[first.name].run(KUBECTL_NODES)
    if result.returncode == 0:
        try:
            listed = parse_nodes(result.stdout)
        except NodeError:
            listed = []
    others = [n for n in nodes if n.name != first.name]
    todo = [n for n in others if find(n, listed) is None]
    report.already = [n.name for n in others if n not in todo]
    if todo:
        ttl = token_lifetime(token_ttl, len(todo))
        report.commands.append((first.name, ("microk8s", "add-node", "--token", "<token>",
                                             "--token-ttl", str(ttl))))
    for node in todo:
        argv = ["microk8s", "join", f"{first.address}:{DEFAULT_AGENT_PORT}/<token>/<hash>"]
        if node.worker:
            argv.append("--worker")
        report.commands.append((node.name, tuple(argv)))
    report.commands.append((first.name, KUBECTL_NODES))
    return report


async def form_cluster(nodes: Sequence[ClusterNode], runners: Mapping[str, Runner], *,
                       token_ttl: int | None = None, ready_timeout: float = 600,
                       poll: float = 2.0, progress: Progress | None = None) -> JoinReport:
    """add-node once, join the nodes not yet in the cluster one at a time, wait for Ready."""
    say = progress or (lambda node, step, text: None)
    first = first_control_plane(nodes)
    lead = runners[first.name]
    report = JoinReport(first.name)
    listed = await node_step(first.name, "list nodes", kube_nodes(lead), _RUN_AGAIN)
    others = [n for n in nodes if n.name != first.name]
    todo = [n for n in others if find(n, listed) is None]
    report.already = [n.name for n in others if n not in todo]
    for name in report.already:
        say(name, "join", "already in the cluster")
    if todo:
        token = secrets.token_hex(16)
        ttl = token_lifetime(token_ttl, len(todo))
        add = ("microk8s", "add-node", "--token", token, "--token-ttl", str(ttl))
        report.commands.append((first.name, _shown(add, token)))
        say(first.name, "add-node", f"token valid {ttl} s, for {len(todo)} join(s)")
        result = await node_step(first.name, "add-node",
                                 _run_checked(lead, add, "add-node", token), _RUN_AGAIN)
        url = join_url(first.address, token, result)
        for node in todo:
            argv = ["microk8s", "join", url]
            if node.worker:
                argv.append("--worker")
            report.commands.append((node.name, _shown(argv, token)))
            say(node.name, "join", "as a worker" if node.worker else "as a control-plane node")
            await node_step(node.name, "join",
                            _run_checked(runners[node.name], argv, "join", token), _RUN_AGAIN)
            report.joined.append(node.name)
    say(first.name, "ready", f"waiting for {len(nodes)} node(s) to be Ready")
    report.ready = await wait_ready(nodes, lead, timeout=ready_timeout, poll=poll)
    return report


async def _run_checked(runner: Runner, argv: Sequence[str], step: str, token: str) -> str:
    result = await runner.run(argv)
    if result.returncode != 0:
        # never print the token: it lets anyone who reads the log join the cluster
        result.argv = _shown(result.argv, token)
        result.stdout = result.stdout.replace(token, "<token>")
        result.stderr = result.stderr.replace(token, "<token>")
        check(runner, result, step)
    return result.stdout


_RUN_AGAIN = ("fix the cause and run `gapkit cluster up` again: nodes already in the cluster "
              "are skipped")


async def node_step(node: str, step: str, work: Any, hint: str | None = None) -> Any:
    """Await `work`; a NodeError becomes a NodeStepError naming the node and the step (with
    `hint` when the error has none)."""
    try:
        return await work
    except NodeStepError:
        raise
    except NodeError as exc:
        raise NodeStepError(node, step, exc.message.removeprefix(f"{node}: "),
                            exc.hint or hint) from None


async def wait_ready(nodes: Sequence[ClusterNode], runner: Runner, *, timeout: float,
                     poll: float = 2.0) -> list[str]:
    """Until `kubectl get nodes` lists every node Ready; ClusterError naming the others."""
    deadline = time.monotonic() + timeout
    while True:
        result = await runner.run(KUBECTL_NODES)
        waiting: list[str] = []
        if result.returncode == 0:
            listed = parse_nodes(result.stdout)
            for node in nodes:
                kube = find(node, listed)
                if kube is None:
                    waiting.append(f"{node.name} (not listed)")
                elif not kube.ready:
                    waiting.append(f"{node.name} (not Ready)")
            if not waiting:
                return [n.name for n in nodes]
        else:
            waiting = [f"all: `{shlex.join(result.argv)}` failed: "
                       f"{(result.stderr or result.stdout).strip()[-300:]}"]
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"after {timeout:.0f} s not every node is Ready: " + ", ".join(waiting),
                hint="look at `microk8s inspect` on those nodes (images, default route, ports "
                "25000/16443/19001 between nodes), then run `gapkit cluster up` again")
        await asyncio.sleep(poll)

