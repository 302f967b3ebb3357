"""
Unit tests for L{aura_proxy.upstream_health}: the prober's rounds, its
findings (up with the connect time, down with the error, a timeout) and its
stop, against a C{MemoryReactorClock} (connections made by hand).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.config import parse_config
from aura_proxy.upstream_health import UpstreamProber, upstream_address

INI = """
[gateway]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1

[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:9000

[route:aura2]
path = /api/aura2/**
upstream = http://127.0.0.1:9000/v2

[route:tools]
path = /api/tools/**
upstream = https://10.0.0.7
"""


class ProberTests(SynchronousTestCase):
    """L{UpstreamProber} on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(500.0)
        self.routes = parse_config(INI, "gw.ini").routes
        self.prober = UpstreamProber(self.routes, self.reactor, interval=5.0, timeout=2.0)
        self.addCleanup(lambda: self.prober.running and self.prober.stopService())

    def connect(self, index: int) -> Any:
        """Complete the C{index}th connection attempt; the transport it got."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport

    def refuse(self, index: int) -> None:
        """Fail the C{index}th connection attempt as refused."""
        connector = self.reactor.connectors[index]
        self.reactor.tcpClients[index][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def test_addressFromTheUpstreamUrl(self) -> None:
        """The probed port is the URL's, or 80/443 by scheme."""
        self.assertEqual([upstream_address(r) for r in self.routes],
                         [("127.0.0.1", 9000), ("127.0.0.1", 9000), ("10.0.0.7", 443)])

    def test_endpointByAddressKind(self) -> None:
        """IPv4 and IPv6 literals connect directly; a host name goes through the reactor's resolver."""
        self.assertIsInstance(self.prober._endpoint("127.0.0.1", 80), TCP4ClientEndpoint)
        self.assertIsInstance(self.prober._endpoint("::1", 80), TCP6ClientEndpoint)
        self.assertIsInstance(self.prober._endpoint("agent.internal", 80), HostnameEndpoint)

    def test_oneConnectPerDistinctUpstreamAtStart(self) -> None:
        """Starting probes at once, each distinct host:port once (two routes share one upstream)."""
        self.prober.startService()
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients], [("127.0.0.1", 9000), ("10.0.0.7", 443)])
        self.assertEqual([c[3] for c in self.reactor.tcpClients], [2.0, 2.0])
        report = self.prober.report()
        self.assertEqual(set(report), {"aura", "aura2", "tools"})
        self.assertIsNone(report["aura"]["up"])

    def test_upWithConnectTimeThenClosed(self) -> None:
        """A connection made: up, with how long the connect took; the prober closes it at once."""
        self.prober.startService()
        self.reactor.advance(0.25)
        transport = self.connect(0)
        self.assertTrue(transport.disconnecting)
        report = self.prober.report()
        self.assertEqual(
            (report["aura"]["up"], report["aura"]["connect_ms"], report["aura"]["checked_at"]), (True, 250.0, 500.25)
        )
        self.assertEqual(report["aura2"], report["aura"])
        self.assertIsNone(report["tools"]["up"])

    def test_refusedIsDownWithTheError(self) -> None:
        """A refused connection: down, and the error kept (also after the next success)."""
        self.prober.startService()
        self.refuse(1)
        tools = self.prober.report()["tools"]
        self.assertFalse(tools["up"])
        self.assertIn("ConnectionRefusedError", str(tools["last_error"]))
        self.connect(0)
        self.reactor.advance(5.0)
        self.connect(3)
        tools = self.prober.report()["tools"]
        self.assertTrue(tools["up"])
        self.assertIn("ConnectionRefusedError", str(tools["last_error"]))

    def test_timeoutIsDown(self) -> None:
        """An upstream that does not answer within C{timeout}: down, with a timeout error."""
        self.prober.startService()
        self.connect(1)
        self.reactor.advance(2.0)
        aura = self.prober.report()["aura"]
        self.assertFalse(aura["up"])
        self.assertIn("TimeoutError", str(aura["last_error"]))

    def test_roundEveryInterval(self) -> None:
        """A new round every C{interval} seconds, once the last one has ended."""
        self.prober.startService()
        self.connect(0)
        self.connect(1)
        self.reactor.advance(5.0)
        self.assertEqual(len(self.reactor.tcpClients), 4)

    def test_noNewRoundWhileOneIsPending(self) -> None:
        """A round whose connects have not ended yet is not doubled by the next tick."""
        prober = UpstreamProber(self.routes, self.reactor, interval=1.0, timeout=10.0)
        prober.startService()
        self.addCleanup(prober.stopService)
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_stopEndsTheRounds(self) -> None:
        """Once stopped: no timer left, the pending connects cancelled and not counted as down."""
        self.prober.startService()
        self.prober.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(10.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertIsNone(self.prober.report()["aura"]["up"])
