"""The registry store against real `docker-registry` peers (plain HTTP, TLS, htpasswd, tokens).

Faults (resets, 503/429, stalls, wrong bytes) come from `FaultProxy`, a reverse proxy in front of
a real registry; bearer tokens from `TokenServer`, whose JWTs a real registry verifies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from yarl import URL

from gapkit.errors import AuthError, DigestMismatch, NotFound, RegistryError, UsageError
from gapkit.oci.auth import CredentialSource, DockerConfig
from gapkit.oci.model import Descriptor, Digest, Manifest
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.registry import (
    HostOptions,
    ProxyConfig,
    RegistryStore,
    api_root,
    retry_after,
)
from gapkit.oci.stream import VerifiedStream
from tests.support import peers
from tests.support.faults import Fault, FaultProxy
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.peers import Registry, free_port, wait_for_port
from tests.support.tokens import TokenRegistry, TokenServer

BIG = 3 * 1024 * 1024  # above the monolithic limit the tests set, so uploads stream


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An OCI layout: `app` (config, a small and a 3 MiB layer) and `multi` (an index)."""
    specs = [
        ImageSpec("app", [make_layer(1, 2000), make_layer(2, BIG)]),
        ImageSpec("multi", [make_layer(3, 1500)], others={"linux/arm64": [make_layer(4, 1700)]}),
    ]
    root = tmp_path / "layout"
    return root, write_layout(root, specs)


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[FaultProxy]]]:
    """Start `FaultProxy`s in front of registries; all are stopped at the end."""
    started: list[FaultProxy] = []

    async def start(upstream: Registry, prefix: str = "") -> FaultProxy:
        proxy = await FaultProxy(upstream.url, prefix).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def token_server(tmp_path: Path) -> AsyncIterator[TokenServer]:
    server = await TokenServer(tmp_path / "token-server", {"gapkit": "s3cret"},
                               anonymous_pull=True, refresh_tokens={"rt-1234": "gapkit"}).start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def token_registry(tmp_path: Path, token_server: TokenServer) -> Iterator[TokenRegistry]:
    reg = TokenRegistry(tmp_path / "token-registry", users={"gapkit": "s3cret"},
                        token_server=token_server)
    try:
        yield reg.start()
    finally:
        reg.stop()


def plain(*hosts: str, **extra: object) -> RegistryStore:
    """A store that speaks plain HTTP to `hosts`, with quick retries for tests."""
    settings: dict[str, object] = {"backoff": 0.05, "monolithic_limit": 1024 * 1024,
                                   "proxies": ProxyConfig()}
    settings.update(extra)
    return RegistryStore(hosts={h: HostOptions(plain_http=True) for h in hosts},
                         **settings)  # type: ignore[arg-type]


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def blob_bytes(layout: Path, digest: Digest) -> bytes:
    return (layout / "blobs" / digest.algorithm / digest.hex).read_bytes()


async def copy_image(store: RegistryStore, src: Reference, dst: Reference) -> Manifest:
    """Blobs then manifest, every blob through `VerifiedStream`, as the copy engine does."""
    manifest = await store.get_manifest(src)
    for desc in manifest.blobs:
        if await store.head_blob(dst.repository, desc.digest) is None:
            stream = VerifiedStream(store.open_blob(src.repository, desc), desc)
            await store.put_blob(dst.repository, desc, stream)
    await store.put_manifest(dst, manifest)
    return manifest


async def never(descriptor: Descriptor) -> AsyncIterator[bytes]:
    """A blob stream that must not be read (the registry should mount the blob instead)."""
    raise AssertionError(f"the stream of {descriptor.digest} was read")
    yield b""  # pragma: no cover - makes this an async generator


# --- reads ---------------------------------------------------------------------------------------


async def test_store_implements_the_protocol() -> None:
    store = RegistryStore()
    assert isinstance(store, Store)
    await store.close()


async def test_pulls_manifests_by_tag_and_by_digest_with_exact_bytes(
        registry: Registry, layout: tuple[Path, dict[str, str]]) -> None:
    root, digests = layout
    registry.push_layout(root, "app", "demo/app:v1")
    registry.push_layout(root, "multi", "demo/multi:v1")
    store = plain(registry.host)
    try:
        for name in ("app", "multi"):
            expected = Digest.parse(digests[name])
            by_tag = await store.get_manifest(Reference.parse(f"{registry.host}/demo/{name}:v1"))
            assert by_tag.digest == expected
            assert by_tag.raw == blob_bytes(root, expected)
            by_digest = await store.get_manifest(
                Reference.parse(f"{registry.host}/demo/{name}@{expected}"))
            assert by_digest.raw == by_tag.raw
            head = await store.head_manifest(Reference.parse(f"{registry.host}/demo/{name}:v1"))
            assert head == by_tag.descriptor()
        index = await store.get_manifest(Reference.parse(f"{registry.host}/demo/multi:v1"))
        assert index.is_index and len(index.manifests) == 2
        child = await store.get_manifest(
            Reference.parse(f"{registry.host}/demo/multi@{index.manifests[1].digest}"))
        assert child.digest == index.manifests[1].digest

        app = await store.get_manifest(Reference.parse(f"{registry.host}/demo/app:v1"))
        for desc in app.blobs:
            assert await store.head_blob(Repository.parse(f"{registry.host}/demo/app"),
                                         desc.digest) == desc.size
            data = await read_all(store.open_blob(
                Repository.parse(f"{registry.host}/demo/app"), desc))
            assert data == blob_bytes(root, desc.digest)
        layer = app.layers[1]
        tail = await read_all(store.open_blob(Repository.parse(f"{registry.host}/demo/app"),
                                              layer, offset=1000))
        assert tail == blob_bytes(root, layer.digest)[1000:]
        assert await read_all(store.open_blob(Repository.parse(f"{registry.host}/demo/app"),
                                              layer, offset=layer.size)) == b""
    finally:
        await store.close()


async def test_missing_content_is_not_found_naming_the_image(registry: Registry) -> None:
    store = plain(registry.host)
    missing = Reference.parse(f"{registry.host}/demo/none:v9")
    try:
        assert await store.head_manifest(missing) is None
        with pytest.raises(NotFound) as caught:
            await store.get_manifest(missing)
        assert f"{registry.host}/demo/none:v9" in caught.value.message
        digest = Digest.of(b"nothing")
        assert await store.head_blob(missing.repository, digest) is None
        with pytest.raises(NotFound, match=str(digest)):
            await read_all(store.open_blob(missing.repository, Descriptor("x", digest, 7)))
        with pytest.raises(UsageError, match="named"):
            await store.images()
    finally:
        await store.close()


async def test_tags_follow_link_pagination(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    registry.push_layout(root, "multi", "demo/multi:v1")
    proxy = await proxies(registry)
    proxy.add(Fault("paginate", path="/tags/list$", times=100))
    store = plain(registry.host, proxy.host, tag_page_size=2)
    try:
        manifest = await store.get_manifest(Reference.parse(f"{registry.host}/demo/multi:v1"))
        for tag in ("v2", "v3", "v4", "a-first"):
            await store.put_manifest(Reference.parse(f"{registry.host}/demo/multi:{tag}"),
                                     manifest)
        tags = await store.tags(Repository.parse(f"{proxy.host}/demo/multi"))
        assert tags == ["a-first", "v1", "v2", "v3", "v4"]
        pages = proxy.seen("GET", "/tags/list")
        assert len(pages) == 3
        assert all(p.query.get("n") == "2" for p in pages)
        assert "last" in pages[1].query
    finally:
        await store.close()


# --- pushes --------------------------------------------------------------------------------------


async def test_copies_between_registries_and_finds_what_is_already_there(
        registry: Registry, second_registry: Registry,
        layout: tuple[Path, dict[str, str]]) -> None:
    root, digests = layout
    registry.push_layout(root, "app", "demo/app:v1")
    registry.push_layout(root, "multi", "demo/multi:v1")
    store = plain(registry.host, second_registry.host)
    try:
        src = Reference.parse(f"{registry.host}/demo/app:v1")
        dst = Reference.parse(f"{second_registry.host}/copied/app:v1")
        manifest = await copy_image(store, src, dst)
        assert any(d.size > 1024 * 1024 for d in manifest.blobs)  # one streamed upload
        copied = await store.get_manifest(dst)
        assert copied.raw == manifest.raw and str(copied.digest) == digests["app"]
        for desc in manifest.blobs:
            assert await store.head_blob(dst.repository, desc.digest) == desc.size
        # An index: children by digest first, then the index under its tag.
        index = await store.get_manifest(Reference.parse(f"{registry.host}/demo/multi:v1"))
        dst_multi = Reference.parse(f"{second_registry.host}/copied/multi:v1")
        for child in index.manifests:
            await copy_image(store, Reference.parse(f"{registry.host}/demo/multi@{child.digest}"),
                             Reference(dst_multi.repository, None, child.digest))
        await store.put_manifest(dst_multi, index)
        status, _, headers = second_registry.request(
            "/v2/copied/multi/manifests/v1", "HEAD",
            headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        assert status == 200 and headers["Docker-Content-Digest"] == digests["multi"]
        # skopeo, an independent client, reads the copy.
        out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{dst}"], check=True, capture_output=True).stdout
        assert out == manifest.raw
    finally:
        await store.close()


async def test_second_push_of_a_blob_is_skipped_after_head(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy = await proxies(registry)
    store = plain(registry.host, proxy.host)
    try:
        src = Reference.parse(f"{registry.host}/demo/app:v1")
        dst = Reference.parse(f"{proxy.host}/again/app:v1")
        await copy_image(store, src, dst)
        uploads = len(proxy.seen("PUT", "/blobs/uploads/"))
        assert uploads == 3
        await copy_image(RegistryStore(hosts={proxy.host: HostOptions(plain_http=True),
                                              registry.host: HostOptions(plain_http=True)}),
                         src, dst)
        assert len(proxy.seen("PUT", "/blobs/uploads/")) == uploads
        assert len(proxy.seen("HEAD", "/again/app/blobs/")) == 6
    finally:
        await store.close()


async def test_blob_known_in_another_repository_is_mounted_not_uploaded(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy = await proxies(registry)
    store = plain(registry.host, proxy.host)
    try:
        src = Reference.parse(f"{registry.host}/demo/app:v1")
        first = Reference.parse(f"{proxy.host}/one/app:v1")
        manifest = await copy_image(store, src, first)
        second = Repository.parse(f"{proxy.host}/two/app")
        for desc in manifest.blobs:
            await store.put_blob(second, desc, never(desc))
            assert await store.head_blob(second, desc.digest) == desc.size
        mounts = proxy.seen("POST", "^/v2/two/app/blobs/uploads/$")
        assert [m.query.get("from") for m in mounts] == ["one/app"] * 3
        assert {m.query.get("mount") for m in mounts} == {str(d.digest) for d in manifest.blobs}
        assert not proxy.seen("PATCH", "/two/") and not proxy.seen("PUT", "/two/")
    finally:
        await store.close()


async def test_a_failing_stream_commits_nothing_and_keeps_its_error(
        registry: Registry, layout: tuple[Path, dict[str, str]]) -> None:
    root, _ = layout
    registry.push_layout(root, "app", "demo/app:v1")
    store = plain(registry.host)
    repo = Repository.parse(f"{registry.host}/demo/app")
    try:
        manifest = await store.get_manifest(Reference.parse(f"{registry.host}/demo/app:v1"))
        for desc in manifest.blobs:
            liar = Descriptor(desc.media_type, Digest.of(b"something else"), desc.size)
            target = Repository.parse(f"{registry.host}/broken/app")
            with pytest.raises(DigestMismatch):  # not a connection error: the real cause
                await store.put_blob(target, liar,
                                     VerifiedStream(store.open_blob(repo, desc), liar))
            assert await store.head_blob(target, liar.digest) is None
            # Unverified bytes: the registry itself refuses them, reported as a mismatch.
            with pytest.raises(DigestMismatch, match=r"the registry \S+ refused it"):
                await store.put_blob(target, liar, store.open_blob(repo, desc))
            assert await store.head_blob(target, liar.digest) is None
    finally:
        await store.close()


async def test_blob_redirects_leave_credentials_behind(
        auth_registry: Registry, registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    auth_registry.push_layout(root, "app", "demo/app:v1")
    registry.push_layout(root, "app", "demo/app:v1")  # stands in for the blob storage
    front = await proxies(auth_registry)
    storage = await proxies(registry)
    store = RegistryStore(hosts={front.host: HostOptions(plain_http=True,
                                                         credentials=("gapkit", "s3cret"))},
                          backoff=0.05, proxies=ProxyConfig())
    try:
        manifest = await store.get_manifest(Reference.parse(f"{front.host}/demo/app:v1"))
        layer = manifest.layers[1]
        blob_path = f"/v2/demo/app/blobs/{layer.digest}"
        front.add(Fault("status", path=blob_path, status=307, times=2,
                        headers={"Location": f"{storage.url}{blob_path}?X-Signature=s1%2Bx"}))
        storage.add(Fault("reset", path=blob_path, after=1_000_000))
        data = await read_all(VerifiedStream(
            store.open_blob(Repository.parse(f"{front.host}/demo/app"), layer), layer))
        assert data == blob_bytes(root, layer.digest)
        assert all("Authorization" in r.headers for r in front.seen("GET", blob_path))
        served = storage.seen("GET", blob_path)
        assert len(served) == 2 and not any("Authorization" in r.headers for r in served)
        assert served[0].query["X-Signature"] == "s1+x"
        assert served[1].headers["Range"].startswith("bytes=")  # resumed via the registry
    finally:
        await store.close()


# --- TLS and auth --------------------------------------------------------------------------------


async def test_tls_works_with_the_ca_file_and_names_the_ca_option_without_it(
        tls_registry: Registry, layout: tuple[Path, dict[str, str]]) -> None:
    root, digests = layout
    tls_registry.push_layout(root, "app", "demo/app:v1")
    ref = Reference.parse(f"{tls_registry.host}/demo/app:v1")
    assert tls_registry.tls is not None
    trusted = RegistryStore(hosts={tls_registry.host: HostOptions(ca_file=tls_registry.tls.ca_cert)})
    untrusted = RegistryStore(retries=0)
    plain_http = plain(tls_registry.host)
    try:
        assert str((await trusted.get_manifest(ref)).digest) == digests["app"]
        with pytest.raises(RegistryError) as caught:
            await untrusted.get_manifest(ref)
        assert "certificate" in caught.value.message and tls_registry.host in caught.value.message
        assert caught.value.hint is not None and f"--ca {tls_registry.host}=FILE" in caught.value.hint
        with pytest.raises(RegistryError) as wrong_scheme:
            await plain_http.get_manifest(ref)
        assert wrong_scheme.value.hint == f"drop --plain-http {tls_registry.host}"
    finally:
        for store in (trusted, untrusted, plain_http):
            await store.close()


async def test_basic_auth_takes_right_credentials_and_refuses_wrong_ones(
        auth_registry: Registry, layout: tuple[Path, dict[str, str]]) -> None:
    root, digests = layout
    auth_registry.push_layout(root, "app", "demo/app:v1")
    ref = Reference.parse(f"{auth_registry.host}/demo/app:v1")
    host = auth_registry.host
    right = RegistryStore(hosts={host: HostOptions(plain_http=True, credentials=("gapkit", "s3cret"))})
    wrong = RegistryStore(hosts={host: HostOptions(plain_http=True, credentials=("gapkit", "nope"))})
    anonymous = RegistryStore(hosts={host: HostOptions(plain_http=True)},
                              docker_config=Path("/nonexistent/config.json"))
    try:
        assert str((await right.get_manifest(ref)).digest) == digests["app"]
        await copy_image(right, ref, Reference.parse(f"{host}/pushed/app:v1"))
        with pytest.raises(AuthError) as refused:
            await wrong.get_manifest(ref)
        assert "refused the credentials" in refused.value.message
        assert "'gapkit'" in refused.value.message and str(ref) in refused.value.message
        assert refused.value.hint is not None and "--creds" in refused.value.hint
        with pytest.raises(AuthError, match="none are configured"):
            await anonymous.head_manifest(ref)
    finally:
        for store in (right, wrong, anonymous):
            await store.close()


async def test_credentials_come_from_docker_config_auths(
        auth_registry: Registry, layout: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, digests = layout
    auth_registry.push_layout(root, "app", "demo/app:v1")
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {
        f"http://{auth_registry.host}/v2/": {"auth": base64.b64encode(b"gapkit:s3cret").decode()},
        "https://index.docker.io/v1/": {"username": "hub-user", "password": "hub-pass"},
    }}))
    store = RegistryStore(hosts={auth_registry.host: HostOptions(plain_http=True)},
                          docker_config=config)
    try:
        manifest = await store.get_manifest(Reference.parse(f"{auth_registry.host}/demo/app:v1"))
        assert str(manifest.digest) == digests["app"]
    finally:
        await store.close()
    hub = await CredentialSource(docker_config=config).lookup("docker.io")
    assert hub is not None and hub.username == "hub-user"


async def test_credentials_come_from_a_credential_helper(
        auth_registry: Registry, layout: tuple[Path, dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root, digests = layout
    auth_registry.push_layout(root, "app", "demo/app:v1")
    # A test credential helper (a stand-in for docker-credential-pass & co.): it logs the server
    # URL Docker's protocol passes on stdin and answers with the test registry's user.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "helper-asked.txt"
    helper = bin_dir / "docker-credential-test"
    helper.write_text(
        "#!/bin/sh\n"
        "# Test credential helper for gapkit's tests.\n"
        f'[ "$1" = get ] || exit 1\nread server\necho "$server" >> {asked}\n'
        f'if [ "$server" = "{auth_registry.host}" ]; then\n'
        '  echo \'{"ServerURL":"\'"$server"\'","Username":"gapkit","Secret":"s3cret"}\'\n'
        "else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n")
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {auth_registry.host: "test"},
                                  "credsStore": "test"}))
    store = RegistryStore(hosts={auth_registry.host: HostOptions(plain_http=True)},
                          docker_config=config)
    try:
        manifest = await store.get_manifest(Reference.parse(f"{auth_registry.host}/demo/app:v1"))
        assert str(manifest.digest) == digests["app"]
        assert asked.read_text().split() == [auth_registry.host]  # asked once, cached
        assert await CredentialSource(docker_config=config).lookup("docker.io") is None
        assert asked.read_text().split()[-1] == "https://index.docker.io/v1/"
    finally:
        await store.close()
    assert DockerConfig.load(config).helper_for("quay.io") == "test"
    missing = tmp_path / "missing-helper.json"
    missing.write_text(json.dumps({"credsStore": "gapkit-no-such-helper"}))
    with pytest.raises(AuthError) as no_helper:
        await CredentialSource(docker_config=missing).lookup("quay.io")
    assert "docker-credential-gapkit-no-such-helper" in no_helper.value.message
    assert no_helper.value.hint is not None and "--creds" in no_helper.value.hint


async def test_bearer_tokens_are_fetched_once_per_scope_and_reused(
        token_registry: TokenRegistry, token_server: TokenServer,
        layout: tuple[Path, dict[str, str]]) -> None:
    root, digests = layout
    # skopeo asks the token server, which runs in this event loop: push from a thread.
    await asyncio.to_thread(token_registry.push_layout, root, "app", "demo/app:v1")
    token_server.requests.clear()
    host = token_registry.host
    store = RegistryStore(hosts={host: HostOptions(plain_http=True,
                                                   credentials=("gapkit", "s3cret"))},
                          monolithic_limit=1024 * 1024)
    try:
        src = Reference.parse(f"{host}/demo/app:v1")
        await copy_image(store, src, Reference.parse(f"{host}/copy/app:v1"))
        await copy_image(store, src, Reference.parse(f"{host}/copy/app:v2"))
        await copy_image(store, src, Reference.parse(f"{host}/more/app:v1"))  # mounts
        scopes = token_server.scopes_requested()
        assert len(scopes) == len(set(scopes))  # never the same scope twice in one session
        assert set(scopes) == {
            ("repository:demo/app:pull",),
            ("repository:copy/app:pull",),  # the HEADs before the push
            ("repository:copy/app:pull,push",),
            ("repository:more/app:pull",),
            # The mount asks for pull on the source too; with it the push token covers more/app.
            ("repository:more/app:pull,push", "repository:copy/app:pull"),
        }
        assert all(r.user == "gapkit" and r.service for r in token_server.requests)
        token_server.requests.clear()
        fresh = RegistryStore(hosts={host: HostOptions(plain_http=True,
                                                       credentials=("gapkit", "s3cret"))})
        manifest = await fresh.get_manifest(src)
        assert await fresh.get_manifest(src.with_digest(manifest.digest)) == manifest
        await fresh.close()
        assert str(manifest.digest) == digests["app"]
        assert token_server.scopes_requested() == [("repository:demo/app:pull",)]
        # Anonymous clients get a pull token, and a push is refused with a clear error.
        anonymous = RegistryStore(hosts={host: HostOptions(plain_http=True)},
                                  docker_config=Path("/nonexistent/config.json"))
        assert str((await anonymous.get_manifest(src)).digest) == digests["app"]
        with pytest.raises(AuthError) as denied:
            await anonymous.put_manifest(Reference.parse(f"{host}/anon/app:v1"), manifest)
        assert "none are configured" in denied.value.message
        await anonymous.close()
        wrong = RegistryStore(hosts={host: HostOptions(plain_http=True,
                                                       credentials=("gapkit", "bad"))})
        with pytest.raises(AuthError, match=r"token server .* refused the credentials"):
            await wrong.get_manifest(src)
        await wrong.close()
    finally:
        await store.close()


async def test_identity_token_from_docker_config_is_exchanged_at_the_realm(
        token_registry: TokenRegistry, token_server: TokenServer,
        layout: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, digests = layout
    await asyncio.to_thread(token_registry.push_layout, root, "app", "demo/app:v1")
    token_server.requests.clear()
    config = tmp_path / "identity.json"
    config.write_text(json.dumps({"auths": {token_registry.host: {"identitytoken": "rt-1234"}}}))
    store = RegistryStore(hosts={token_registry.host: HostOptions(plain_http=True)},
                          docker_config=config)
    try:
        src = Reference.parse(f"{token_registry.host}/demo/app:v1")
        manifest = await copy_image(store, src,
                                    Reference.parse(f"{token_registry.host}/idt/app:v1"))
        assert str(manifest.digest) == digests["app"]
        assert {r.user for r in token_server.requests} == {"gapkit"}
        assert ("repository:idt/app:pull,push",) in token_server.scopes_requested()
    finally:
        await store.close()


async def test_cross_repository_mount_asks_for_pull_on_the_source(
        token_registry: TokenRegistry, token_server: TokenServer,
        layout: tuple[Path, dict[str, str]]) -> None:
    root, _ = layout
    # skopeo asks the token server, which runs in this event loop: push from a thread.
    await asyncio.to_thread(token_registry.push_layout, root, "app", "demo/app:v1")
    host = token_registry.host
    store = RegistryStore(hosts={host: HostOptions(plain_http=True,
                                                   credentials=("gapkit", "s3cret"))})
    try:
        manifest = await store.get_manifest(Reference.parse(f"{host}/demo/app:v1"))
        target = Repository.parse(f"{host}/mounted/app")
        token_server.requests.clear()
        for desc in manifest.blobs:
            assert await store.head_blob(Repository.parse(f"{host}/demo/app"), desc.digest)
            await store.put_blob(target, desc, never(desc))
            assert await store.head_blob(target, desc.digest) == desc.size
        assert ("repository:mounted/app:pull,push", "repository:demo/app:pull") in \
            token_server.scopes_requested()
    finally:
        await store.close()


# --- retries and resumption ----------------------------------------------------------------------


async def test_a_reset_download_resumes_with_range(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy = await proxies(registry)
    store = plain(proxy.host)
    try:
        manifest = await store.get_manifest(Reference.parse(f"{proxy.host}/demo/app:v1"))
        layer = manifest.layers[1]
        proxy.add(Fault("reset", path=f"/blobs/{layer.digest}", after=1_500_000))
        repo = Repository.parse(f"{proxy.host}/demo/app")
        data = await read_all(VerifiedStream(store.open_blob(repo, layer), layer))
        assert data == blob_bytes(root, layer.digest)
        gets = proxy.seen("GET", f"/blobs/{layer.digest}")
        assert len(gets) == 2 and "Range" not in gets[0].headers
        start = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < start <= 1_500_000
        # A server that ignores Range and answers 200: the bytes already sent are skipped.
        proxy.add(Fault("reset", path=f"/blobs/{layer.digest}", after=2_000_000))
        proxy.add(Fault("ignore_range", path=f"/blobs/{layer.digest}"))
        data = await read_all(VerifiedStream(store.open_blob(repo, layer), layer))
        assert data == blob_bytes(root, layer.digest)
    finally:
        await store.close()


async def test_503_with_retry_after_429_and_a_stall_are_retried(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, digests = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy = await proxies(registry)
    store = plain(proxy.host, timeout=1.0)
    try:
        ref = Reference.parse(f"{proxy.host}/demo/app:v1")
        proxy.add(Fault("status", path="/manifests/v1", status=503, headers={"Retry-After": "1"}))
        started = time.monotonic()
        manifest = await store.get_manifest(ref)
        assert time.monotonic() - started >= 0.9  # Retry-After honoured
        assert str(manifest.digest) == digests["app"]
        assert len(proxy.seen("GET", "/manifests/v1")) == 2
        layer = manifest.layers[1]
        proxy.add(Fault("status", path=f"/blobs/{layer.digest}", status=429))
        proxy.add(Fault("stall", path=f"/blobs/{layer.digest}", after=500_000, seconds=3))
        data = await read_all(VerifiedStream(store.open_blob(ref.repository, layer), layer))
        assert data == blob_bytes(root, layer.digest)
        gets = proxy.seen("GET", f"/blobs/{layer.digest}")
        assert len(gets) == 3 and gets[2].headers["Range"].startswith("bytes=")
    finally:
        await store.close()


async def test_retries_are_bounded_and_the_error_names_the_registry(
        registry: Registry, proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    proxy = await proxies(registry)
    proxy.add(Fault("status", path="/manifests/", status=502, times=100))
    store = plain(proxy.host, retries=2)
    ref = Reference.parse(f"{proxy.host}/demo/app:v1")
    try:
        with pytest.raises(RegistryError) as caught:
            await store.get_manifest(ref)
        assert proxy.host in caught.value.message and "HTTP 502" in caught.value.message
        assert "injected (UNAVAILABLE)" in caught.value.message
        assert len(proxy.seen("GET", "/manifests/")) == 3
    finally:
        await store.close()
    port = free_port()
    nobody = plain(f"127.0.0.1:{port}")
    try:
        with pytest.raises(RegistryError) as refused:
            await nobody.get_manifest(Reference.parse(f"127.0.0.1:{port}/demo/app:v1"))
        assert f"127.0.0.1:{port}" in refused.value.message
        assert refused.value.hint is not None and "address and port" in refused.value.hint
    finally:
        await nobody.close()


async def test_wrong_bytes_fail_with_digest_mismatch(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, _ = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy = await proxies(registry)
    store = plain(proxy.host)
    try:
        manifest = await store.get_manifest(Reference.parse(f"{proxy.host}/demo/app:v1"))
        layer = manifest.layers[0]
        proxy.add(Fault("corrupt", path=f"/blobs/{layer.digest}", after=100))
        with pytest.raises(DigestMismatch, match=str(layer.digest)):
            await read_all(VerifiedStream(
                store.open_blob(Repository.parse(f"{proxy.host}/demo/app"), layer), layer))
    finally:
        await store.close()


# --- mirrors and proxies -------------------------------------------------------------------------


async def test_reads_go_through_the_mirror_with_ns_and_fall_back_upstream(
        registry: Registry, second_registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, digests = layout
    upstream, mirror_registry = registry, second_registry
    mirror_registry.push_layout(root, "app", "demo/app:v1")  # only the mirror has app
    upstream.push_layout(root, "multi", "demo/multi:v1")  # only the upstream has multi
    mirror = await proxies(mirror_registry, prefix="/cache")
    dead = f"http://127.0.0.1:{free_port()}"
    store = plain(upstream.host, mirrors={upstream.host: [dead, mirror.url]})
    try:
        app = await store.get_manifest(Reference.parse(f"{upstream.host}/demo/app:v1"))
        assert str(app.digest) == digests["app"]
        layer = app.layers[1]
        repo = Repository.parse(f"{upstream.host}/demo/app")
        data = await read_all(VerifiedStream(store.open_blob(repo, layer), layer))
        assert data == blob_bytes(root, layer.digest)
        assert mirror.seen("GET", "^/v2/demo/app/manifests/v1$")
        assert all(r.query.get("ns") == upstream.host for r in mirror.seen(path="^/v2/.+"))
        multi = await store.get_manifest(Reference.parse(f"{upstream.host}/demo/multi:v1"))
        assert str(multi.digest) == digests["multi"]
        assert mirror.seen("GET", "^/v2/demo/multi/manifests/v1$")  # asked first, had none
        # Presence checks answer for the registry itself: a push decides on them.
        assert await store.head_manifest(Reference.parse(f"{upstream.host}/demo/app:v1")) is None
        assert await store.head_blob(repo, layer.digest) is None
        # Writes never go to a mirror.
        await store.put_manifest(Reference.parse(f"{upstream.host}/demo/multi:v2"), multi)
        assert await store.tags(Repository.parse(f"{upstream.host}/demo/multi")) == ["v1", "v2"]
        assert not mirror.seen("PUT") and not mirror.seen("POST")
        with pytest.raises(NotFound) as missing:
            await store.get_manifest(Reference.parse(f"{upstream.host}/demo/none:v1"))
        assert mirror.url in missing.value.message  # what the mirror said is kept
    finally:
        await store.close()


async def test_docker_hub_content_comes_from_its_mirror(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    root, digests = layout
    registry.push_layout(root, "app", "library/app:v1")
    mirror = await proxies(registry)
    store = RegistryStore(mirrors={"docker.io": [mirror.url]}, proxies=ProxyConfig())
    try:
        manifest = await store.get_manifest(Reference.parse("app:v1"))
        assert str(manifest.digest) == digests["app"]
        assert mirror.seen("GET", "^/v2/library/app/manifests/v1$")[0].query["ns"] == "docker.io"
    finally:
        await store.close()
    assert api_root("docker.io", HostOptions()) == "https://registry-1.docker.io/v2"
    assert api_root("127.0.0.1:5000", HostOptions(plain_http=True)) == "http://127.0.0.1:5000/v2"


def test_retry_after_takes_seconds_or_an_http_date_and_is_capped() -> None:
    now = 1_700_000_000.0
    assert retry_after("3", 60) == 3.0
    assert retry_after("3600", 60) == 60.0
    assert retry_after("Tue, 14 Nov 2023 22:13:40 GMT", 60, now=now) == 20.0
    assert retry_after("Tue, 14 Nov 2023 22:00:00 GMT", 60, now=now) == 0.0
    assert retry_after("soon", 60) is None and retry_after("", 60) is None


def test_no_proxy_follows_go_rules() -> None:
    config = ProxyConfig(http="proxy:3128", https="http://proxy:3128", no_proxy=(
        "internal.example", ".corp.example", "reg.example:5000", "10.0.0.0/8", "192.0.2.7",
        "[2001:db8::1]:443"))

    def via(url: str) -> str | None:
        return config.proxy_for(URL(url))

    assert via("https://quay.io/v2/") == "http://proxy:3128"
    assert via("http://quay.io/v2/") == "http://proxy:3128"
    assert via("https://internal.example/v2/") is None
    assert via("https://a.internal.example/v2/") is None
    assert via("https://corp.example/v2/") == "http://proxy:3128"
    assert via("https://x.corp.example/v2/") is None
    assert via("http://reg.example:5000/v2/") is None
    assert via("http://reg.example:5001/v2/") == "http://proxy:3128"
    assert via("https://10.1.2.3/v2/") is None
    assert via("https://11.1.2.3/v2/") == "http://proxy:3128"
    assert via("https://192.0.2.7:8443/v2/") is None
    assert via("https://[2001:db8::1]/v2/") is None
    assert via("http://127.0.0.1:5000/v2/") is None  # loopback never goes through a proxy
    assert via("http://localhost:5000/v2/") is None
    assert ProxyConfig(https="http://p:1", no_proxy=("*",)).proxy_for(
        URL("https://x.io/")) is None
    env = ProxyConfig.from_env({"https_proxy": "http://p:1", "NO_PROXY": "a.io, b.io"})
    assert env.https == "http://p:1" and env.no_proxy == ("a.io", "b.io")


@pytest.fixture
def loopback_name() -> str:
    """This machine's host name, when it resolves to loopback (as Debian's /etc/hosts does).

    Go programs and gapkit never send loopback addresses through a proxy, so a proxy test
    needs the registry under a name.
    """
    name = socket.gethostname()
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        resolved = ""
    if not resolved.startswith("127."):
        pytest.skip(f"the host name {name!r} does not resolve to loopback here")
    return name


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real tinyproxy on loopback: its URL and its log (one line per request)."""
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{log}\"\n"
                    "LogLevel Connect\nMaxClients 20\nAllow 127.0.0.1\n")
    process = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(process.pid, 15)
        process.wait(5)


async def test_plain_http_goes_through_http_proxy_unless_no_proxy_names_it(
        registry: Registry, layout: tuple[Path, dict[str, str]], loopback_name: str,
        tinyproxy: tuple[str, Path]) -> None:
    root, digests = layout
    registry.push_layout(root, "app", "demo/app:v1")
    proxy_url, log = tinyproxy
    host = f"{loopback_name}:{registry.port}"
    ref = Reference.parse(f"{host}/demo/app:v1")
    env = {"HTTP_PROXY": proxy_url, "NO_PROXY": "example.com"}
    for no_proxy, proxied in (("example.com", True), (loopback_name, False),
                              ("127.0.0.0/8", True), (f"{loopback_name}:{registry.port}", False)):
        before = log.read_text().count("/v2/demo/app/manifests/v1") if log.exists() else 0
        store = RegistryStore(hosts={host: HostOptions(plain_http=True)},
                              proxies=ProxyConfig.from_env({**env, "NO_PROXY": no_proxy}))
        try:
            assert str((await store.get_manifest(ref)).digest) == digests["app"]
        finally:
            await store.close()
        await asyncio.sleep(0.1)
        after = log.read_text().count("/v2/demo/app/manifests/v1")
        assert (after > before) == proxied, no_proxy


async def test_https_goes_through_the_proxy_by_connect_with_the_ca_file(
        tmp_path: Path, layout: tuple[Path, dict[str, str]], loopback_name: str,
        tinyproxy: tuple[str, Path]) -> None:
    root, digests = layout
    ca = peers.TestCA(tmp_path / "named-ca").create(names=(loopback_name,))
    reg = Registry(tmp_path / "named-tls", tls=ca).start()
    try:
        reg.push_layout(root, "app", "demo/app:v1")
        proxy_url, log = tinyproxy
        host = f"{loopback_name}:{reg.port}"
        store = RegistryStore(hosts={host: HostOptions(ca_file=ca.ca_cert)},
                              proxies=ProxyConfig.from_env({"HTTPS_PROXY": proxy_url}))
        try:
            manifest = await store.get_manifest(Reference.parse(f"{host}/demo/app:v1"))
            assert str(manifest.digest) == digests["app"]
        finally:
            await store.close()
        await asyncio.sleep(0.1)
        assert f"CONNECT {host}" in log.read_text()
    finally:
        reg.stop()


async def test_json_nested_too_deep_from_a_hostile_registry_is_a_clear_error() -> None:
    """A stand-in for a hostile registry (no real registry sends this): tag lists and error
    bodies nested 100 000 deep, past what Python's JSON parser can take."""
    from aiohttp import web

    deep = "[" * 100_000 + "]" * 100_000

    async def tags(request: web.Request) -> web.Response:
        return web.Response(text=deep, content_type="application/json")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text=deep, content_type="application/json")

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", ping)
    app.router.add_get("/v2/evil/app/tags/list", tags)
    app.router.add_get("/v2/evil/app/manifests/{ref}", missing)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = plain(f"127.0.0.1:{port}")
    try:
        with pytest.raises(RegistryError, match="other than a tag list"):
            await store.tags(Repository.parse(f"127.0.0.1:{port}/evil/app"))
        with pytest.raises(NotFound):
            await store.get_manifest(Reference.parse(f"127.0.0.1:{port}/evil/app:1"))
    finally:
        await store.close()
        await runner.cleanup()


async def test_a_blob_sent_again_after_a_broken_upload_counts_once_in_the_progress(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    from gapkit.oci.copy import BlobProgress, CopyEvent, CopyRequest, copy
    from gapkit.oci.stores.layout import LayoutStore

    root, _ = layout
    proxy = await proxies(registry)
    proxy.add(Fault("reset", method="PATCH", path="/blobs/uploads/", after=1_000_000))
    progress: dict[str, int] = {}

    def on_event(event: CopyEvent) -> None:
        if isinstance(event, BlobProgress):
            progress[str(event.digest)] = progress.get(str(event.digest), 0) + event.nbytes

    source = LayoutStore(root, create=False)
    store = plain(proxy.host)
    try:
        app = Reference.parse("app")
        report = await copy(source, store, [CopyRequest(app, Reference.parse(
            f"{proxy.host}/team/app:1"))], on_event=on_event)
    finally:
        await store.close()
        await source.close()
    assert proxy.faults[0].fired == 1
    manifest = await LayoutStore(root, create=False).get_manifest(app)
    big = max(manifest.layers, key=lambda d: d.size)
    assert big.size > 1_000_000  # streamed, and cut part-way by the reset
    assert progress[str(big.digest)] == big.size
    assert report.bytes_copied == sum(progress.values())


async def test_an_upload_broken_while_its_source_is_being_read_is_sent_again(
        registry: Registry, layout: tuple[Path, dict[str, str]],
        proxies: Callable[..., Awaitable[FaultProxy]]) -> None:
    """The source is a layout on a slow disk, so the connection breaks while the upload body is
    waiting for the next chunk: aiohttp then cancels the body, and that must count as a broken
    upload (sent again), not end the copy with a CancelledError (seen once in CI)."""
    from gapkit.oci.copy import CopyRequest, copy
    from gapkit.oci.stores.layout import LayoutStore

    class SlowLayout(LayoutStore):
        async def open_blob(self, repository: Repository, descriptor: Descriptor,
                            offset: int = 0) -> AsyncIterator[bytes]:
            async for chunk in super().open_blob(repository, descriptor, offset):
                await asyncio.sleep(0.05)
                yield chunk

    root, _ = layout
    proxy = await proxies(registry)
    proxy.add(Fault("reset", method="PATCH", path="/blobs/uploads/", after=300_000))
    source = SlowLayout(root, create=False)
    store = plain(proxy.host)
    target = Reference.parse(f"{proxy.host}/team/app:1")
    try:
        report = await copy(source, store, [CopyRequest(Reference.parse("app"), target)])
        assert proxy.faults[0].fired == 1
        assert (await store.get_manifest(target)).digest == report.images[0].digest
    finally:
        await store.close()
        await source.close()
