"""`gapkit node listen`: hold MicroK8s' ports open before MicroK8s is installed.

`gapkit node check --peers` connects to every port MicroK8s needs on every peer; on a node
where nothing listens yet, each port would only say "refused", which hides whether a firewall
lets the traffic through. Run `gapkit node listen` on that node: it binds the ports, answers
each TCP connection and each UDP datagram with a banner naming its host, and the check can pass
before anything is installed. It binds sockets, so it always runs on the machine it is started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gapkit.errors import NodeError
from gapkit.node.ports import NodePort
from gapkit.node.probes import BANNER


@dataclass
class ListenReport:
    address: str
    duration: float | None
    listening: list[NodePort] = field(default_factory=list)
    #: Ports that could not be bound, and why ("already in use").
    skipped: dict[str, str] = field(default_factory=dict)
    connections: int = 0

    def to_json(self) -> dict[str, object]:
        return {"address": self.address, "duration": self.duration,
                "listening": [p.label for p in self.listening], "skipped": self.skipped,
                "connections": self.connections}


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, banner: bytes, report: ListenReport) -> None:
        self.banner = banner
        self.report = report
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        self.report.connections += 1
        if self.transport is not None:
            self.transport.sendto(self.banner, addr)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


async def listen(ports: Sequence[NodePort], address: str = "0.0.0.0", duration: float | None = None,
                 on_ready: Callable[[ListenReport], None] | None = None,
                 hostname: str | None = None) -> ListenReport:
    """Bind `ports` on `address` and answer until `duration` seconds pass (None: until cancelled).

    A port already in use is skipped and named in the report (MicroK8s itself may hold it); if
    none can be bound, this is an error.
    """
    banner = BANNER + (hostname or socket.gethostname()).encode() + b"\n"
    report = ListenReport(address, duration)
    loop = asyncio.get_running_loop()
    closers: list[Callable[[], None]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        report.connections += 1
        try:
            writer.write(banner)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        for port in ports:
            try:
                if port.protocol == "tcp":
                    server = await asyncio.start_server(answer, address, port.port,
                                                        family=_family(address), reuse_address=True)
                    closers.append(server.close)
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _Echo(banner, report), local_addr=(address, port.port),
                        family=_family(address))
                    closers.append(transport.close)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    report.skipped[port.label] = "already in use (MicroK8s or another program)"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    raise NodeError(f"{address} is not an address of this node",
                                    hint="give --address one of this node's addresses, or 0.0.0.0"
                                    ) from None
                elif exc.errno == errno.EACCES:
                    report.skipped[port.label] = "permission denied"
                else:
                    report.skipped[port.label] = exc.strerror or str(exc)
                continue
            report.listening.append(port)
        if not report.listening:
            raise NodeError(f"none of the ports could be bound on {address}: "
                            + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()),
                            hint="MicroK8s may already hold them: then `gapkit node check` on "
                            "the peers can reach it directly")
        if on_ready is not None:
            on_ready(report)
        if duration is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration)
    finally:
        for close in closers:
            close()
    return report
