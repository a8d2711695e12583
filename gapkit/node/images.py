"""`gapkit images import`: side-load images into MicroK8s on this node (Option C), then prove it.

How the images go in depends on the MicroK8s release (`microk8s version`):

- 1.25 and newer: `microk8s images import < TAR`. It reads the whole tar into memory and posts
  it to every node of the cluster, whose agents run `ctr image import --platform <arch> -`.
  A gapkit bundle is therefore not sent as is (its snaps and other platforms' blobs would go
  into memory and to every node): a lean tar of the node's platform is exported from it first
  (`gapkit.bundle.export.export_images`, into a temp folder). Any other image tar goes as is.
- older releases: `microk8s ctr image import --platform <os/arch> - < TAR`. ctr streams the tar
  and skips the members it does not know, so a bundle goes as is, without a copy.

MicroK8s' import prints its failures and still exits 0 (README §4, §8 pain point 7), so the
command's exit code proves nothing: afterwards `microk8s ctr image ls` (namespace k8s.io) must
list every image of the source by name, with the source's digest. A `docker save` tar is
re-digested by containerd on import, so for those only the names are checked.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.errors import NodeError, UsageError
from gapkit.node.plan import CommandResult, Runner
from gapkit.oci.copy import EventHandler
from gapkit.oci.model import Platform

#: The first MicroK8s release with `microk8s images import`.
IMAGES_IMPORT_SINCE = (1, 25)
_VERSION = re.compile(r"\bv?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class MicroK8sVersion:
    major: int
    minor: int
    patch: int
    #: The line `microk8s version` printed.
    text: str

    @classmethod
    def parse(cls, output: str) -> MicroK8sVersion:
        """From `MicroK8s v1.28.3 revision 6089`."""
        line = next((line.strip() for line in output.splitlines() if line.strip()), "")
        match = _VERSION.search(line)
        if match is None:
            raise NodeError(f"cannot tell the MicroK8s release from `microk8s version`: {line!r}")
        return cls(int(match[1]), int(match[2]), int(match[3] or 0), line)

    @property
    def has_images_import(self) -> bool:
        return (self.major, self.minor) >= IMAGES_IMPORT_SINCE

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass
class ImageCheck:
    name: str
    #: The source's digest; None when containerd re-digests the image (docker save tars).
    expected: str | None
    #: What `ctr image ls` shows for the name after the import; None: not there.
    found: str | None

    @property
    def ok(self) -> bool:
        return self.found is not None and (self.expected is None or self.found == self.expected)

    def problem(self) -> str:
        if self.found is None:
            return f"{self.name} is not there"
        return f"{self.name} is there as {self.found}, not {self.expected}"


@dataclass
class ImportReport:
    node: str
    version: MicroK8sVersion
    platform: Platform
    command: tuple[str, ...]
    #: What was fed to the command: the source itself, or a lean tar exported from the bundle.
    fed: str
    output: str = ""
    images: list[ImageCheck] = field(default_factory=list)

    @property
    def missing(self) -> list[ImageCheck]:
        return [i for i in self.images if not i.ok]

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "microk8s": str(self.version), "platform": str(self.platform),
                "command": list(self.command), "fed": self.fed, "output": self.output,
                "images": [{"name": i.name, "expected": i.expected, "found": i.found, "ok": i.ok}
                           for i in self.images]}


async def microk8s_version(runner: Runner) -> MicroK8sVersion:
    result = await runner.run(["microk8s", "version"])
    if result.returncode == 127:
        raise NodeError(f"{runner.name}: MicroK8s is not installed (no `microk8s` command)",
                        hint="install it first (gapkit node install), then import the images")
    _check(runner, result)
    return MicroK8sVersion.parse(result.stdout)


async def node_platform(runner: Runner) -> Platform:
    result = await runner.run(["uname", "-m"])
    _check(runner, result)
    machine = result.stdout.strip().lower()
    if machine in ("armv7l", "armv6l"):
        return Platform.normalised("linux", "arm", machine[3:5])
    return Platform.normalised("linux", machine)


async def listed_images(runner: Runner) -> dict[str, str]:
    """`microk8s ctr image ls` (namespace k8s.io): name -> digest."""
    result = await runner.run(["microk8s", "ctr", "image", "ls"])
    _check(runner, result)
    out = {}
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("sha256:"):
            out[fields[0]] = fields[2]
    return out


def _check(runner: Runner, result: CommandResult) -> None:
    if result.returncode != 0:
        raise NodeError(f"{runner.name}: `{' '.join(result.argv)}` failed with exit code "
                        f"{result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}")


async def import_images(runner: Runner, source: Path, temp_dir: Path | None = None,
                        on_event: EventHandler | None = None) -> ImportReport:
    """Import every image of `source` (a bundle or an image tar) into MicroK8s on the node,
    then check `microk8s ctr image ls` lists each by name and digest; `NodeError` if not."""
    from gapkit.bundle.sources import open_image_source
    from gapkit.oci.stores.archive import ArchiveStore

    if source.is_dir():
        raise UsageError(f"{source} is a folder; give a bundle or an image tar",
                         hint=f"make a tar of a layout: gapkit copy oci:{source} "
                         "oci-archive:images.tar")
    version = await microk8s_version(runner)
    platform = await node_platform(runner)
    opened = await open_image_source(source)
    try:
        refs = await opened.store.images()
        redigested = isinstance(opened.store, ArchiveStore) and opened.store.format == "docker"
        platforms = opened.platforms
    finally:
        await opened.store.close()
    if not refs:
        raise UsageError(f"{source} holds no named image")
    if platforms is not None and platform not in platforms:
        raise NodeError(f"{source} holds images for {', '.join(map(str, platforms))}, and this "
                        f"node is {platform}", hint="build a bundle with --platform " + str(platform))
    expected = {str(ref.with_digest(None)): (None if redigested or ref.digest is None
                                             else str(ref.digest)) for ref in refs}
    with tempfile.TemporaryDirectory(prefix="gapkit-import-", dir=temp_dir) as tmp:
        fed = source
        if version.has_images_import:
            command: tuple[str, ...] = ("microk8s", "images", "import")
            if opened.bundle is not None:
                from gapkit.bundle.export import export_images

                fed = Path(tmp) / "images.tar"
                await export_images(source, fed, [platform], on_event=on_event)
        else:
            command = ("microk8s", "ctr", "image", "import", "--platform", str(platform), "-")
        result = await runner.run(command, stdin=fed)
    report = ImportReport(runner.name, version, platform, command,
                          "the source" if fed == source else f"a {platform} tar exported from it",
                          (result.stdout + result.stderr).strip())
    _check(runner, result)
    listed = await listed_images(runner)
    report.images = [ImageCheck(name, digest, listed.get(name))
                     for name, digest in sorted(expected.items())]
    if report.missing:
        said = f"; it said: {report.output[-800:]}" if report.output else ""
        raise NodeError(
            f"{runner.name}: {len(report.missing)} of {len(report.images)} image(s) missing "
            f"after `{' '.join(command)}` (which exited 0): "
            + "; ".join(i.problem() for i in report.missing) + said,
            hint="MicroK8s prints import failures and still exits 0; check free disk under "
            "/var/snap/microk8s/common and the platform of the images, then run again")
    return report
