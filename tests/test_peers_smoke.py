from pathlib import Path

from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.peers import Registry


def test_registry_fixture_takes_a_pushed_image(registry: Registry, tmp_path: Path) -> None:
    digests = write_layout(tmp_path / "src", [ImageSpec("app", [make_layer(1, 2000)])])
    registry.push_layout(tmp_path / "src", "app", "demo/app:v1")
    status, _, headers = registry.request(
        "/v2/demo/app/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200
    assert headers["Docker-Content-Digest"] == digests["app"]
