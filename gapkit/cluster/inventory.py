"""The inventory: which nodes make the cluster, how to reach them, how they get images.

```yaml
ssh:                      # defaults for every node
  user: root
  port: 22
  key: ~/.ssh/id_ed25519   # or the ssh agent (and ~/.ssh/id_*) when absent
  known_hosts: ~/.ssh/known_hosts
  sudo: false              # run node commands through `sudo -n`
  accept_new_host_keys: false   # true: trust a node's key on first connect (and say so)
  connect_timeout: 10      # seconds
  command_timeout: 900     # seconds, per command
nodes:
  - {name: node1, address: 198.51.100.11}                  # role defaults to control-plane
  - {name: node2, address: 198.51.100.12, user: ubuntu, sudo: true}
  - {name: node3, address: 198.51.100.13, role: worker}
images:                   # how nodes get images
  mode: mirror            # mirror | sideload
  mirror: http://198.51.100.10:5000
  ca: ./ca.crt            # for an https mirror
proxy: http://proxy.example:3128   # optional, Option A
```

Per-node keys override the `ssh:` ones. Unknown keys are errors, and so are two nodes with one
name or one address, and an inventory without a control-plane node. Relative paths (`key`,
`known_hosts`, `ca`) are relative to the inventory file; `~` expands.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gapkit.errors import UsageError
from gapkit.yamlfile import _dotted, _line_of, load_model

Role = Literal["control-plane", "worker"]
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?$")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    path = path.expanduser()
    if path.is_absolute():
        return path
    return Path((info.context or {}).get("base", ".")) / path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SSHKeys(_Strict):
    """The SSH keys a node may override (all optional here)."""

    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    key: Path | None = None
    known_hosts: Path | None = None
    sudo: bool | None = None
    accept_new_host_keys: bool | None = None

    @field_validator("key", "known_hosts")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info) if value is not None else None

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", value):
            raise ValueError(f"{value!r} is not a user name")
        return value


class SSHDefaults(_SSHKeys):
    user: str | None = "root"
    port: int | None = Field(default=22, ge=1, le=65535)
    sudo: bool | None = False
    accept_new_host_keys: bool | None = False
    connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=900.0, gt=0)


class NodeSpec(_SSHKeys):
    name: str
    address: str
    role: Role = "control-plane"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a node name: lower-case letters, digits, '-' and "
                             "'.' (the node's host name, as Kubernetes shows it)")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        text = value.strip("[]")
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        if not _HOST.match(text) or text.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is not an IP address or a host name")
        return text


class ImagesSpec(_Strict):
    mode: Literal["mirror", "sideload"] = "mirror"
    mirror: str | None = None
    ca: Path | None = None

    @field_validator("mirror")
    @classmethod
    def _mirror(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not a registry URL: write http(s)://HOST[:PORT]")
        return value.rstrip("/")

    @field_validator("ca")
    @classmethod
    def _ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> ImagesSpec:
        if self.mode == "mirror" and self.mirror is None:
            raise ValueError("mode mirror needs `mirror: http(s)://HOST:PORT`")
        if self.ca is not None and (self.mirror is None or not self.mirror.startswith("https:")):
            raise ValueError("`ca` is the CA of an https mirror: give `mirror: https://...` too")
        return self


class Inventory(_Strict):
    ssh: SSHDefaults = Field(default_factory=SSHDefaults)
    nodes: list[NodeSpec] = Field(min_length=1)
    images: ImagesSpec | None = None
    proxy: str | None = None

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not a proxy URL: write http://HOST:PORT")
        return value

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise UsageError(f"no node {name!r} in the inventory",
                         hint=f"the nodes are {', '.join(n.name for n in self.nodes)}")

    @property
    def control_planes(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == "control-plane"]

    def target(self, node: NodeSpec) -> SSHTarget:
        """How to reach `node`: its own SSH keys over the `ssh:` defaults."""
        d = self.ssh

        def pick(key: str) -> Any:
            own = getattr(node, key)
            return own if own is not None else getattr(d, key)

        return SSHTarget(
            name=node.name, address=node.address, user=pick("user"), port=pick("port"),
            key=pick("key"), known_hosts=pick("known_hosts") or DEFAULT_KNOWN_HOSTS.expanduser(),
            sudo=bool(pick("sudo")), accept_new_host_keys=bool(pick("accept_new_host_keys")),
            connect_timeout=d.connect_timeout, command_timeout=d.command_timeout)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What a single node cannot tell: duplicates, no control plane (as (key path, message))."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        names: dict[str, int] = {}
        addresses: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.name in names:
                out.append((("nodes", i, "name"),
                            f"{node.name!r} is already the name of nodes[{names[node.name]}]"))
            names.setdefault(node.name, i)
            if node.address in addresses:
                out.append((("nodes", i, "address"), f"{node.address} is already the address of "
                            f"nodes[{addresses[node.address]}]"))
            addresses.setdefault(node.address, i)
        if not self.control_planes:
            out.append((("nodes",), "no control-plane node: at least one node needs "
                        "`role: control-plane` (the default) to form the cluster"))
        return out


@dataclass(frozen=True)
class SSHTarget:
    """One node's SSH settings, every default filled in."""

    name: str
    address: str
    user: str
    port: int
    key: Path | None
    known_hosts: Path
    sudo: bool
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0
    command_timeout: float = 900.0


def load_inventory(path: Path) -> Inventory:
    """Read and validate an inventory file; every problem names the key and its line."""
    path = path.expanduser()
    inventory = load_model(path, Inventory)
    problems = inventory.problems()
    if problems:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        lines = []
        for loc, message in problems:
            line = _line_of(node, loc)
            lines.append(f"{path}:{line}: {_dotted(loc)}: {message}" if line
                         else f"{path}: {_dotted(loc)}: {message}")
        raise UsageError(lines[0] if len(lines) == 1 else f"{path} has {len(lines)} problems:\n"
                         + "\n".join(f"  {line}" for line in lines),
                         hint="each node needs a name and an address of its own")
    return inventory
