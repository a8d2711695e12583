"""`gapkit registry serve` under load: many concurrent clients, in a process of their own
(`tests/support/load.py`), pull manifests and blobs for a bounded time. No request may fail or
get a wrong byte, and the server's memory stays flat (its RSS, read from /proc while the load
runs). How fast it serves, beside docker-registry, is `python -m bench load`'s job, not a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import bcrypt

from tests.registry.test_serve import serving
from tests.reliability.test_serve_attack import GOOD, PASSWORD, USER
from tests.support.images import OCI_INDEX, OCI_MANIFEST, ImageSpec, make_layer, write_layout

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 64
SECONDS = 8.0
#: How much the server's RSS may grow over its level before the load.
RSS_GROWTH_LIMIT = 40 * 1024 * 1024
#: Layer sizes of the images: small ones, as most blobs are, and one of 4 MB.
IMAGES = {
    "docker.io/library/nginx:1.27": [1, 2],
    "docker.io/calico/cni:v3.28.1": [3, 4, 5],
    "quay.io/team/app:1": [6],
    "registry.k8s.io/pause:3.10": [7],
    "registry.k8s.io/coredns/coredns:v1.11.1": [8, 9],
}
SIZES = {1: 4_000_000, 2: 1_000, 3: 200_000, 4: 30_000, 5: 500, 6: 80_000, 7: 700, 8: 120_000,
         9: 5_000}


def load_targets(root: Path, digests: dict[str, str]) -> list[dict[str, str]]:
    """Every image's manifest by tag (with `?ns=`, as containerd asks) and by digest, its
    config and its layers: what a pull fetches."""
    targets = []
    for name, digest in digests.items():
        upstream, rest = name.split("/", 1)
        repo, tag = rest.rsplit(":", 1)
        manifest = json.loads((root / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
        accept = f"{OCI_MANIFEST}, {OCI_INDEX}"
        targets += [{"path": f"/v2/{repo}/manifests/{tag}?ns={upstream}", "digest": digest,
                     "accept": accept},
                    {"path": f"/v2/{repo}/manifests/{digest}?ns={upstream}", "digest": digest,
                     "accept": accept}]
        for blob in [manifest["config"], *manifest["layers"]]:
            targets.append({"path": f"/v2/{repo}/blobs/{blob['digest']}?ns={upstream}",
                            "digest": blob["digest"]})
    return targets


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_many_clients_pull_for_seconds_with_no_error_and_flat_memory(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    digests = write_layout(root, [ImageSpec(name, [make_layer(seed, SIZES[seed]) for seed in seeds])
                                  for name, seeds in IMAGES.items()])
    bundle = tmp_path / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{USER}:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode() + "\n")
    targets = load_targets(root, digests)
    with serving(bundle, tmp_path / "serve", "--tls", "off", "--htpasswd", str(htpasswd),
                 "--access-log", str(tmp_path / "access.log")) as served:
        assert served.process is not None
        pid = served.process.pid
        for target in targets:  # each blob is hashed once before it is first served
            assert served.request(target["path"], headers={"Authorization": GOOD})[0] == 200
        before = rss(pid)
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                samples.append(rss(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        spec = {"base": served.url, "clients": CLIENTS, "seconds": SECONDS, "timeout": 20,
                "authorization": GOOD, "targets": targets}
        try:
            run = subprocess.run([sys.executable, "-m", "tests.support.load", json.dumps(spec)],
                                 capture_output=True, text=True, cwd=REPO_ROOT,
                                 timeout=SECONDS + 60)
        finally:
            done.set()
            sampler.join()
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        peak = max(samples, default=before)
        print(f"\n{CLIENTS} clients for {result['seconds']:.1f} s: {result['requests']} requests "
              f"({result['rps']:.0f}/s), p50 {result['p50_ms']:.1f} ms, p99 "
              f"{result['p99_ms']:.1f} ms, max {result['max_ms']:.0f} ms, "
              f"{result['bytes'] / 1e6:.0f} MB; server RSS {before / 2**20:.0f} MiB -> peak "
              f"{peak / 2**20:.0f} MiB ({len(samples)} samples)")
        assert result["errors"] == 0, result["error_samples"]
        assert result["requests"] >= CLIENTS * 10  # the load did happen
        assert len(samples) >= SECONDS * 2
        assert peak - before < RSS_GROWTH_LIMIT, (before, peak)
    log = (tmp_path / "access.log").read_text()
    assert "Traceback" not in log
    assert log.count('" 200 ') >= result["requests"]

