"""Basic auth of `registry serve` (gapkit/registry/auth.py), with real bcrypt hashes."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import pytest

from gapkit.registry import auth
from gapkit.registry.auth import MAX_FAILURES, Htpasswd


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def users(tmp_path: Path) -> Htpasswd:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{user}:{bcrypt.hashpw(user.encode() + b'-pw', bcrypt.gensalt(4)).decode()}\n"
                            for user in ("node", "ops")))
    return Htpasswd.load(path)


async def test_a_guessing_client_is_refused_without_checks_while_others_get_in(
        users: Htpasswd, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[bytes] = []
    real_check = auth._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checked.append(password)
        return real_check(password, hashed)

    monkeypatch.setattr(auth, "_checkpw", counting)
    assert await users.check(basic("node", "node-pw"), "10.0.0.5")  # accepted once: remembered
    for i in range(MAX_FAILURES):
        assert not await users.check(basic("ops", f"guess{i}"), "10.0.0.66")
    assert len(checked) == 1 + MAX_FAILURES
    # The guesser is now refused without a bcrypt check, even with right credentials...
    assert not await users.check(basic("ops", "guess-more"), "10.0.0.66")
    assert not await users.check(basic("ops", "ops-pw"), "10.0.0.66")
    assert len(checked) == 1 + MAX_FAILURES
    # ...while credentials accepted before still pass from there, and other clients get in.
    assert await users.check(basic("node", "node-pw"), "10.0.0.66")
    assert await users.check(basic("ops", "ops-pw"), "10.0.0.7")
    assert len(checked) == 2 + MAX_FAILURES


async def test_the_wait_ends_with_the_window(users: Htpasswd,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    for i in range(MAX_FAILURES):
        assert not await users.check(basic("ops", f"guess{i}"), "10.0.0.66")
    assert not await users.check(basic("ops", "ops-pw"), "10.0.0.66")
    now[0] += auth.FAILURE_WINDOW + 0.1
    assert await users.check(basic("ops", "ops-pw"), "10.0.0.66")


async def test_failures_are_remembered_for_a_bounded_number_of_clients(
        users: Htpasswd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_TRACKED_CLIENTS", 50)
    for i in range(200):
        assert not await users.check(basic("ops", "wrong"), f"10.1.{i // 250}.{i % 250}")
    assert len(users._failures) <= 50
