"""`gapkit node configure` on a node root (`--root`), then real containerd pulls through what it
wrote: `ctr --hosts-dir` and the CRI plugin (the kubelet's path), whose `config_path` is the
root's `var/snap/microk8s/current/args/certs.d`.

Stand-ins (TESTBED.md): `snap` (and `microk8s`) are the executables of
`tests/support/microk8s.py`, first on PATH, which record their arguments; `snap restart
microk8s` is only recorded. Everything else is real: docker-registry mirrors (plain HTTP, TLS
with a test CA, htpasswd), containerd 1.6 with its CRI plugin, skopeo pushing the images, and
tinyproxy for the proxy, which sees the CONNECTs of `ctr` and of the containerd daemon started
with the environment of the `containerd-env` gapkit wrote.

The proxy's loopback trap (Go never proxies localhost or loopback addresses) is handled
without touching the machine's /etc/hosts: the registry is reached by a name
(`registry.gapkit.test`, in its certificate) that only a private hosts file knows, bind-mounted
over /etc/hosts in a mount namespace of its own (`unshare -m`) for tinyproxy and for the `ctr`
that must resolve it itself. Proxied clients never resolve the name: the proxy does.

Each node root starts with MicroK8s' shipped files (data/microk8s/defaults): containerd-env,
the containerd template, kube-proxy and kube-apiserver args, certs.d/docker.io and
certs.d/localhost:32000 (renamed as the install hook does).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from gapkit.node.configure import (
    CONTAINERD_ENV,
    DEFAULT_UPSTREAMS,
    configure_options,
    plan_configure,
    set_env_vars,
)
from gapkit.node.plan import LocalRunner
from gapkit.oci.reference import Reference
from gapkit.registry.push import PushTarget, hosts_files
from tests.support import peers
from tests.support.cli import gapkit
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.microk8s import ARGS, NodeContainerd, StandInMicroK8s, cri_pull
from tests.support.peers import Registry, free_port, wait_for_port

DEFAULTS = Path("/work/shared/data/microk8s/defaults")
PAUSE = "registry.k8s.io/pause:3.10"
CALICO = ["docker.io/calico/cni:v3.28.1", "docker.io/calico/node:v3.28.1"]
IMAGES = [PAUSE, *CALICO]
PROXY_NAME = "registry.gapkit.test"
MIRROR_NAME = "mirror.gapkit.test"


@dataclass
class Images:
    layout: Path
    digests: dict[str, str]

    def push(self, registry: Registry, prefix: str = "", upstream_folders: bool = False) -> None:
        """Push every image flat (`HOST/calico/cni`) or under `HOST/PREFIX/<upstream>/...`."""
        for name in self.digests:
            ref = Reference.parse(name)
            parts = [prefix, ref.registry if upstream_folders else "", f"{ref.path}:{ref.tag}"]
            registry.push_layout(self.layout, name, "/".join(p for p in parts if p))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """pause (amd64 + arm64 index, as upstream) and two calico images, in an OCI layout."""
    layout = tmp_path_factory.mktemp("images") / "layout"
    base = make_layer(1, 30_000)
    specs = [ImageSpec(name, [base, make_layer(10 + i, 5_000)],
                       others={"linux/arm64/v8": [make_layer(50 + i, 3_000)]} if "pause" in name
                       else {})
             for i, name in enumerate(IMAGES)]
    return Images(layout, write_layout(layout, specs))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A node root with MicroK8s' shipped files."""
    node = tmp_path / "node"
    args = node / ARGS
    (args / "certs.d" / "docker.io").mkdir(parents=True)
    (args / "certs.d" / "localhost:32000").mkdir()
    for name in ("containerd-env", "containerd-template.toml", "kube-proxy", "kube-apiserver"):
        shutil.copyfile(DEFAULTS / name, args / name)
    shutil.copyfile(DEFAULTS / "certs.d/docker.io/hosts.toml", args / "certs.d/docker.io/hosts.toml")
    shutil.copyfile(DEFAULTS / "certs.d/localhost__32000/hosts.toml",
                    args / "certs.d/localhost:32000/hosts.toml")
    return node


@pytest.fixture
def microk8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInMicroK8s:
    stand_in = StandInMicroK8s(tmp_path / "stand-in").install()
    monkeypatch.setenv("PATH", stand_in.path)
    return stand_in


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def node_path(root: Path, path: PurePosixPath) -> Path:
    return root / str(path).lstrip("/")


def certs(root: Path) -> Path:
    return root / ARGS / "certs.d"


def configure(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return gapkit("node", "configure", "--root", str(root), *args, check=check)


def node_containerd(tmp_path: Path, root: Path) -> NodeContainerd:
    return NodeContainerd(tmp_path / "containerd", cri=True, node_root=root).start()


def pull_everything(daemon: NodeContainerd, root: Path, digests: dict[str, str]) -> None:
    """The CRI plugin (namespace k8s.io) and `ctr --hosts-dir` (another namespace) both pull
    every image by its upstream name; each ends with the digest the mirror holds."""
    for name in digests:
        assert cri_pull(daemon.address, name).startswith("sha256:")
        daemon.ctr("image", "pull", "--platform", "linux/amd64", "--hosts-dir",
                   str(certs(root)), name, namespace="ctr-check")
    for namespace in ("k8s.io", "ctr-check"):
        listed = daemon.ctr("image", "ls", namespace=namespace).stdout
        for name, digest in digests.items():
            line = next((ln for ln in listed.splitlines() if ln.startswith(name + " ")), "")
            assert digest in line, f"{namespace}: {name} should be {digest}:\n{listed}"


# -- plans --------------------------------------------------------------------------------------


def test_dry_run_shows_every_upstream_and_the_proxy_and_writes_nothing(
        root: Path, microk8s: StandInMicroK8s) -> None:
    before = files(root)
    out = configure(root, "--mirror", "http://10.0.0.5:5000", "--proxy", "http://proxy.lan:3128",
                    "--node-address", "198.51.100.10", "--dry-run")
    for upstream in DEFAULT_UPSTREAMS:
        assert f"+++ /var/snap/microk8s/current/args/certs.d/{upstream}/hosts.toml" in out.stdout
    assert "+HTTPS_PROXY=http://proxy.lan:3128" in out.stdout
    assert "$ snap restart microk8s" in out.stdout
    assert "certs.d/localhost:32000: left as it is" in out.stdout
    assert "dry run" in out.stderr
    assert files(root) == before
    assert microk8s.calls() == []


def test_dry_run_json_keeps_passwords_out_and_the_files_root_only(
        root: Path, microk8s: StandInMicroK8s) -> None:
    args = ["--mirror", "http://10.0.0.5:5000", "--creds", "site:Mirr0rPass", "--registries",
            "docker.io", "--proxy", "http://proxy-user:Pr0xyPass@proxy.lan:3128",
            "--node-address", "198.51.100.10"]
    token = base64.b64encode(b"site:Mirr0rPass").decode()
    out = configure(root, *args, "--dry-run", "--json")
    plan = json.loads(out.stdout)["plan"]
    assert json.loads(out.stdout)["applied"] is None
    assert [w["path"] for w in plan["writes"]] == [
        "/var/snap/microk8s/current/args/certs.d/docker.io/hosts.toml", str(CONTAINERD_ENV)]
    assert plan["commands"] == [{"argv": ["snap", "restart", "microk8s"],
                                 "why": "containerd reads containerd-env only when it starts"}]
    for text in (out.stdout, configure(root, *args, "--dry-run").stdout):
        assert "Pr0xyPass" not in text and token not in text and "***" in text
    configure(root, *args)
    hosts = certs(root) / "docker.io/hosts.toml"
    env = node_path(root, CONTAINERD_ENV)
    assert token in hosts.read_text() and "proxy-user:Pr0xyPass@" in env.read_text()
    assert hosts.stat().st_mode & 0o777 == 0o600 and env.stat().st_mode & 0o777 == 0o600


def test_apply_twice_changes_nothing_the_second_time_and_restarts_once(
        root: Path, microk8s: StandInMicroK8s) -> None:
    original_env = node_path(root, CONTAINERD_ENV).read_text()
    local_registry = (certs(root) / "localhost:32000/hosts.toml").read_bytes()

    first = configure(root, "--mirror", "http://10.0.0.5:5000", "--registries",
                      "docker.io,registry.k8s.io")
    assert "no restart is needed" in first.stdout and microk8s.restarts() == 0

    args = ["--mirror", "http://10.0.0.5:5000", "--registries", "docker.io,registry.k8s.io",
            "--proxy", "http://proxy.lan:3128", "--peers", "198.51.100.11,198.51.100.12",
            "--node-address", "198.51.100.10"]
    second = configure(root, *args)
    assert microk8s.restarts() == 1
    assert "# /var/snap/microk8s/current/args/certs.d/docker.io/hosts.toml: already as wanted" \
        in second.stdout
    env = node_path(root, CONTAINERD_ENV).read_text()
    assert env.startswith(original_env)  # every line and comment of MicroK8s' file stays
    assert env.count("HTTPS_PROXY=http://proxy.lan:3128\n") == 1
    no_proxy = next(line for line in env.splitlines() if line.startswith("NO_PROXY="))
    assert no_proxy == ("NO_PROXY=10.1.0.0/16,10.152.183.0/24,localhost,127.0.0.1,"
                        "198.51.100.10,198.51.100.11,198.51.100.12,10.0.0.5")
    assert (certs(root) / "localhost:32000/hosts.toml").read_bytes() == local_registry
    backups = sorted(p.name for p in root.rglob("*.gapkit-backup-*"))
    assert len(backups) == 2  # MicroK8s' docker.io/hosts.toml and containerd-env

    state = files(root)
    third = configure(root, *args)
    assert "nothing to change" in third.stdout
    assert "already configured" in third.stderr
    assert files(root) == state
    assert microk8s.restarts() == 1


async def test_no_proxy_takes_the_ranges_from_the_args_files_and_every_node_address(
        root: Path) -> None:
    (root / ARGS / "kube-proxy").write_text("--cluster-cidr=10.20.0.0/16,fd00:20::/64\n")
    (root / ARGS / "kube-apiserver").write_text("--service-cluster-ip-range 10.30.0.0/24\n")
    options = configure_options(proxy="http://proxy.lan:3128", mirror="https://mirror.lan:5000")
    plan = await plan_configure(LocalRunner(root), options)
    env = next(w for w in plan.writes if w.path == CONTAINERD_ENV).content.decode()
    entries = next(line for line in env.splitlines()
                   if line.startswith("NO_PROXY=")).removeprefix("NO_PROXY=").split(",")
    assert entries[:5] == ["10.20.0.0/16", "fd00:20::/64", "10.30.0.0/24", "localhost",
                           "127.0.0.1"]
    assert "10.1.0.0/16" not in entries and "mirror.lan" in entries
    shown = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for address in shown:
        if not address.startswith(("169.254.", "fe80:", "127.")):
            assert address in entries


def test_containerd_env_keeps_other_lines_and_never_duplicates_our_keys() -> None:
    text = ("# keep me\nexport https_proxy='http://old:1'\nHTTPS_PROXY=\"http://old:1\n\"\n"
            "PATH=$PATH:$KATA_PATH\nHTTPS_PROXY=again\nulimit -n 65536 || true\n")
    wanted = {"HTTP_PROXY": "http://u:p$w@new:3128", "HTTPS_PROXY": "http://u:p$w@new:3128",
              "NO_PROXY": "10.1.0.0/16,localhost"}
    edited = set_env_vars(text, wanted, "# ours\n")
    assert edited.startswith("# keep me\nexport https_proxy='http://u:p$w@new:3128'\n"
                             "HTTPS_PROXY='http://u:p$w@new:3128'\nPATH=$PATH:$KATA_PATH\n"
                             "ulimit -n 65536 || true\n")
    assert edited.count("HTTPS_PROXY=") == 1 and edited.count("# ours") == 1
    assert set_env_vars(edited, wanted, "# ours\n") == edited
    shell = subprocess.run(["sh", "-c", "set -a; . /dev/stdin; env"], input=edited,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert "HTTPS_PROXY=http://u:p$w@new:3128" in shell
    assert "https_proxy=http://u:p$w@new:3128" in shell
    assert "NO_PROXY=10.1.0.0/16,localhost" in shell


def test_an_invalid_hosts_toml_is_reported_and_left_untouched(
        root: Path, microk8s: StandInMicroK8s) -> None:
    broken = b'server = "https://quay.io\n[host."http://10.0.0.5:5000"\n'
    (certs(root) / "quay.io").mkdir()
    (certs(root) / "quay.io/hosts.toml").write_bytes(broken)
    out = configure(root, "--mirror", "http://10.0.0.5:5000", "--registries",
                    "docker.io,quay.io,registry.k8s.io", check=False)
    assert out.returncode == 1
    assert "certs.d/quay.io/hosts.toml is not valid TOML" in out.stderr
    assert "# problem:" in out.stdout
    assert (certs(root) / "quay.io/hosts.toml").read_bytes() == broken
    assert not list((certs(root) / "quay.io").glob("*.gapkit-backup-*"))
    for upstream in ("docker.io", "registry.k8s.io"):
        assert '[host."http://10.0.0.5:5000"]' in (certs(root) / upstream / "hosts.toml").read_text()


def test_a_template_without_config_path_is_a_problem(root: Path, microk8s: StandInMicroK8s) -> None:
    shutil.copyfile(DEFAULTS / "by-branch/containerd-template.1.22-pre-config_path.toml",
                    root / ARGS / "containerd-template.toml")
    out = configure(root, "--mirror", "http://10.0.0.5:5000", check=False)
    assert out.returncode == 1
    assert "sets no config_path" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--mirror", "10.0.0.5:5000"], "say http:// or https://"),
    (["--mirror", "ftp://10.0.0.5"], "say http:// or https://"),
    (["--mirror", "http://u:p@10.0.0.5:5000"], "credentials go in --creds"),
    (["--mirror", "http://10.0.0.5:99999"], "port"),
    (["--mirror", "http://10.0.0.5:5000", "--ca", "/etc/hostname"], "--ca needs an https://"),
    (["--mirror", "http://10.0.0.5:5000", "--registries", "docker.io,not a host"], "not registry"),
    (["--proxy", "proxy.lan:3128"], "scheme"),
    (["--proxy", "http://proxy.lan:3128/path"], "is not a proxy URL"),
    (["--proxy", "http://proxy.lan:31x8"], "port"),
    (["--proxy", "http://proxy.lan:3128", "--no-proxy", "a b"], "cannot be a NO_PROXY entry"),
    (["--ca", "/etc/hostname", "--proxy", "http://proxy.lan:3128"], "need(s) --mirror"),
    ([], "nothing to configure"),
])
def test_a_bad_url_or_flag_is_a_usage_error_and_writes_nothing(
        root: Path, microk8s: StandInMicroK8s, args: list[str], message: str) -> None:
    before = files(root)
    out = configure(root, *args, check=False)
    assert out.returncode == 2, out.stderr
    assert "error:" in out.stderr and message in out.stderr
    assert files(root) == before
    assert microk8s.calls() == []


@pytest.fixture
def read_only_quay(root: Path) -> Iterator[Path]:
    """certs.d/quay.io on a read-only tmpfs (root ignores permission bits; a mount does not)."""
    folder = certs(root) / "quay.io"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_an_unwritable_folder_is_a_clear_error_and_every_file_stays_as_it_was(
        root: Path, read_only_quay: Path, microk8s: StandInMicroK8s) -> None:
    before = files(root)
    out = configure(root, "--mirror", "http://10.0.0.5:5000", "--registries",
                    "docker.io,quay.io,registry.k8s.io", "--proxy", "http://proxy.lan:3128",
                    "--node-address", "198.51.100.10", check=False)
    assert out.returncode == 1
    assert "cannot write /var/snap/microk8s/current/args/certs.d/quay.io/hosts.toml" in out.stderr
    assert "put back" in out.stderr
    assert files(root) == before  # docker.io's file written first, then put back; no backups
    assert microk8s.restarts() == 0


# -- containerd pulls through what was written ----------------------------------------------------


def test_pause_from_registry_k8s_io_and_calico_from_docker_io_resolve_through_a_plain_mirror(
        images: Images, registry: Registry, root: Path, microk8s: StandInMicroK8s,
        tmp_path: Path) -> None:
    images.push(registry)
    configure(root, "--mirror", f"http://{registry.host}", "--bundle", str(images.layout))
    assert sorted(p.name for p in certs(root).iterdir()) == [
        "docker.io", "localhost:32000", "registry.k8s.io"]
    # The same text `gapkit registry push` prints for this mirror and layout.
    printed = hosts_files(["docker.io", "registry.k8s.io"], PushTarget(registry.host), "http",
                          False, False, None)
    for upstream, text in printed.items():
        assert (certs(root) / upstream / "hosts.toml").read_text() == text
    daemon = node_containerd(tmp_path, root)
    try:
        pull_everything(daemon, root, images.digests)
    finally:
        daemon.stop()


def test_https_mirror_with_its_ca_copied_beside_each_hosts_toml(
        images: Images, tls_registry: Registry, test_ca: peers.TestCA, root: Path,
        microk8s: StandInMicroK8s, tmp_path: Path) -> None:
    images.push(tls_registry)
    configure(root, "--mirror", f"https://{tls_registry.host}", "--ca", str(test_ca.ca_cert),
              "--registries", "docker.io,registry.k8s.io")
    for upstream in ("docker.io", "registry.k8s.io"):
        assert (certs(root) / upstream / "ca.crt").read_bytes() == test_ca.ca_cert.read_bytes()
        assert 'ca = "ca.crt"' in (certs(root) / upstream / "hosts.toml").read_text()
    daemon = node_containerd(tmp_path, root)
    try:
        pull_everything(daemon, root, images.digests)
    finally:
        daemon.stop()


def test_basic_auth_mirror_gets_an_authorization_header_in_a_root_only_file(
        images: Images, auth_registry: Registry, root: Path, microk8s: StandInMicroK8s,
        tmp_path: Path) -> None:
    images.push(auth_registry)
    configure(root, "--mirror", f"http://{auth_registry.host}", "--creds", "gapkit:s3cret",
              "--registries", "docker.io,registry.k8s.io")
    hosts = certs(root) / "registry.k8s.io/hosts.toml"
    token = base64.b64encode(b"gapkit:s3cret").decode()
    assert f'"Authorization" = ["Basic {token}"]' in hosts.read_text()
    assert hosts.stat().st_mode & 0o777 == 0o600
    daemon = node_containerd(tmp_path, root)
    try:
        pull_everything(daemon, root, images.digests)
    finally:
        daemon.stop()


def test_upstream_prefix_without_fallback_points_server_at_the_mirror(
        images: Images, registry: Registry, root: Path, microk8s: StandInMicroK8s,
        tmp_path: Path) -> None:
    images.push(registry, prefix="mirror", upstream_folders=True)
    configure(root, "--mirror", f"http://{registry.host}/mirror", "--upstream-prefix",
              "--no-fallback", "--registries", "docker.io,registry.k8s.io")
    text = (certs(root) / "docker.io/hosts.toml").read_text()
    assert f'server = "http://{registry.host}/v2/mirror/docker.io"' in text
    assert "override_path = true" in text and "registry-1.docker.io" not in text
    daemon = node_containerd(tmp_path, root)
    try:
        pull_everything(daemon, root, images.digests)
    finally:
        daemon.stop()


# -- the proxy: tinyproxy sees the CONNECTs ---------------------------------------------------------


@dataclass
class Tinyproxy:
    folder: Path
    hosts_file: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = self.folder / "tinyproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connects(self, host: str) -> int:
        return self.log.count(f"CONNECT {host}")

    def start(self) -> Tinyproxy:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.folder / "tinyproxy.conf"
        config.write_text(f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\n"
                          f'LogFile "{self.folder / "tinyproxy.log"}"\nLogLevel Info\n')
        self.process = subprocess.Popen(
            private_hosts(self.hosts_file, ["tinyproxy", "-d", "-c", str(config)]),
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "stderr", "wb"),  # noqa: SIM115
            start_new_session=True)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def private_hosts(hosts_file: Path, argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own where `hosts_file` is /etc/hosts."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file), *argv]


def shell_environment(env_file: Path) -> dict[str, str]:
    """The environment containerd gets: MicroK8s' wrapper sources the file with `set -a`."""
    out = subprocess.run(["sh", "-c", 'set -a; . "$0"; exec env -0', str(env_file)],
                         capture_output=True, check=True, env=dict(os.environ)).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@pytest.fixture
def named_registry(tmp_path: Path) -> Iterator[tuple[Registry, peers.TestCA]]:
    if os.geteuid() != 0:
        pytest.skip("a private /etc/hosts needs a mount namespace (root)")
    ca = peers.TestCA(tmp_path / "named-ca").create(names=(PROXY_NAME, MIRROR_NAME))
    registry = Registry(tmp_path / "named-registry", tls=ca)
    try:
        yield registry.start(), ca
    finally:
        registry.stop()


def test_proxy_tinyproxy_sees_the_connects_of_ctr_and_of_the_cri_plugin_and_none_for_the_mirror(
        images: Images, named_registry: tuple[Registry, peers.TestCA], root: Path,
        microk8s: StandInMicroK8s, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry, ca = named_registry
    images.push(registry)
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"127.0.0.1 localhost\n127.0.0.1 {PROXY_NAME} {MIRROR_NAME}\n")
    proxy = Tinyproxy(tmp_path / "tinyproxy", hosts_file).start()
    daemon = None
    try:
        configure(root, "--proxy", f"http://127.0.0.1:{proxy.port}", "--mirror",
                  f"https://{MIRROR_NAME}:{registry.port}", "--ca", str(ca.ca_cert),
                  "--registries", "docker.io,registry.k8s.io", "--node-address", "198.51.100.10")
        assert microk8s.restarts() == 1
        env = shell_environment(node_path(root, CONTAINERD_ENV))
        assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{proxy.port}"
        assert MIRROR_NAME in env["NO_PROXY"].split(",")
        # The upstream itself, reached by name: its CA in a hosts.toml of the test's own.
        upstream = f"{PROXY_NAME}:{registry.port}"
        (certs(root) / upstream).mkdir()
        shutil.copyfile(ca.ca_cert, certs(root) / upstream / "ca.crt")
        (certs(root) / upstream / "hosts.toml").write_text(
            f'server = "https://{upstream}"\nca = "ca.crt"\n')
        daemon = NodeContainerd(tmp_path / "containerd", cri=True, node_root=root)
        with monkeypatch.context() as patch:  # the daemon's own environment, as MicroK8s gives it
            for key in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
                patch.setenv(key, env[key])
            daemon.start()
        ctr = ["ctr", "-a", daemon.address, "-n", "via-proxy", "image", "pull", "--platform",
               "linux/amd64", "--hosts-dir", str(certs(root))]

        # ctr downloads in its own process: with the file's environment, through the proxy.
        subprocess.run([*ctr, f"{upstream}/calico/cni:v3.28.1"], env=env, check=True,
                       capture_output=True)
        assert proxy.connects(upstream) >= 1
        seen = proxy.connects(upstream)
        # The CRI plugin pulls in the daemon, with the daemon's environment.
        assert cri_pull(daemon.address, f"{upstream}/calico/node:v3.28.1").startswith("sha256:")
        assert proxy.connects(upstream) > seen
        # The mirror is in NO_PROXY: ctr resolves it itself and connects directly.
        subprocess.run(private_hosts(hosts_file, [*ctr, PAUSE]), env=env, check=True,
                       capture_output=True)
        assert MIRROR_NAME not in proxy.log
        listed = daemon.ctr("image", "ls", namespace="via-proxy").stdout
        assert images.digests[PAUSE] in listed
        assert images.digests["docker.io/calico/cni:v3.28.1"] in listed
    finally:
        if daemon is not None:
            daemon.stop()
        proxy.stop()
