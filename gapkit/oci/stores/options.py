"""Per-registry connection settings, kept apart from the registry client so that reading
command-line flags does not import the HTTP stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Blobs in flight at once. Two cores and a loopback registry saturate at about this many;
#: see bench/ for the measurement behind it.
DEFAULT_JOBS = 6
#: Retries of one request, and resumptions of one blob without progress, before giving up.
DEFAULT_RETRIES = 5
#: Seconds to connect, and the longest silence tolerated while reading.
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class HostOptions:
    """How to reach one registry host (a key such as `127.0.0.1:5000` or `docker.io`)."""

    #: Speak HTTP instead of HTTPS; only when the user asked for it.
    plain_http: bool = False
    #: A PEM file with the CA(s) that signed the registry's certificate (added to the system's).
    ca_file: Path | None = None
    #: HTTPS without certificate verification.
    skip_verify: bool = False
    #: (user, password); wins over the Docker config.
    credentials: tuple[str, str] | None = None
