"""
Reload as operators do it: C{twistd -n aura-proxy --config FILE} in front of
the FastAPI upstream, many SSE streams open, the file changed, and SIGHUP
(C{python -m aura_proxy reload PIDFILE}) or C{POST /reload} on the admin port;
then the same with C{workers = 2}.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from twisted.trial.unittest import TestCase

from tests.integration.gateway import TwistdLog, twistd_ini
from tests.integration.sse_threads import SseClient, post_json, request
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))

#: Open streams during the reload (the issue asks 200; CI machines are small).
STREAMS = int(os.environ.get("AURA_PROXY_RELOAD_STREAMS", "50"))
#: Events per stream, one every INTERVAL seconds: the streams outlive the reloads.
EVENTS, INTERVAL = 80, 0.05

NEW_ROUTE = "[route:new]\npath = /api/new/**\nupstream = http://127.0.0.1:{upstream}/api/aura\nstrip_prefix = 2\n\n"


class ReloadBase(TwistdLog, TestCase):
    """One twistd gateway per test, with a pid file."""

    timeout = 120
    workers = 1

    def sections(self) -> str:
        return "[history]\nenabled = false\n\n[sse]\nresume = off\n\n"

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        self.upstream = start_fastapi_upstream(self)
        self.path = self.workdir / "gateway.ini"
        self.pidfile = self.workdir / "twistd.pid"
        self.path.write_text(self.text())
        self.gateway = start_process(
            self,
            [TWISTD, "-n", f"--pidfile={self.pidfile}", "aura-proxy", "--config", str(self.path)],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
        )
        if self.workers > 1:
            from tests.integration.upstreams import get_json

            self.wait_for(lambda: sum(w["alive"] for w in get_json(
                f"http://127.0.0.1:{self.admin}/healthz")["workers"]) == self.workers, "the workers up")

    def text(self, extra: str = "") -> str:
        gateway = "drain_timeout = 0\n" + (f"workers = {self.workers}\n" if self.workers > 1 else "")
        return twistd_ini(self.listen, self.admin, self.upstream, gateway=gateway,
                          sections=extra + self.sections())

    def status(self, path: str) -> int:
        return request(self.listen, "GET", path, {"X-Tenant-ID": "t1"})[0]


class SingleProcessTests(ReloadBase):
    """One gateway process."""

    def test_reload_under_open_streams(self) -> None:
        """
        With STREAMS streams open, a reload by SIGHUP (the reload command)
        adds a route that answers at once, and every stream goes on to its
        end with all its events in order; an invalid file then changes
        nothing (the new route still answers) and the log names the problem;
        POST /reload answers 200 or 400 with the result.
        """
        self.assertEqual(self.status("/api/new/json"), 404)
        clients = [
            SseClient(self.listen, f"/api/aura/stream?count={EVENTS}&interval={INTERVAL}",
                      {"X-Tenant-ID": "t1", "Accept": "text/event-stream"})
            for _ in range(STREAMS)
        ]
        for client in clients:
            client.start()
        self.wait_for(lambda: all(c.indexes for c in clients), "every stream's first event")

        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        reloaded = subprocess.run(
            [sys.executable, "-m", "aura_proxy", "reload", str(self.pidfile)],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.wait_for(lambda: self.status("/api/new/json") == 200, "the new route")
        self.assertIn("reloaded", self.log())

        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)) +
                             "[limits]\nmax_streams_total = lots\n")
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.wait_for(lambda: "[limits] max_streams_total" in self.log(), "the refusal in the log")
        self.assertIn("refused", self.log())
        self.assertEqual(self.status("/api/new/json"), 200)
        status, body = post_json(self.admin, "/reload")
        self.assertEqual(status, 400)
        self.assertEqual(body["status"], "refused")
        self.assertIn("[limits] max_streams_total: expected a whole number", body["problems"][0])

        self.path.write_text(self.text())
        status, body = post_json(self.admin, "/reload")
        self.assertEqual((status, body["status"], body["routes"]), (200, "reloaded", 1))
        self.assertEqual(self.status("/api/new/json"), 404)

        for client in clients:
            client.join(60)
        for client in clients:
            self.assertIsNone(client.error)
            self.assertEqual(client.status, 200)
            self.assertEqual(client.indexes, list(range(1, EVENTS + 1)))
            self.assertTrue(client.done)
        # No stall either: the longest silence of any stream (events every
        # INTERVAL s) stays far below a reconnect's (generous under CI load).
        longest = max(c.longest_gap for c in clients)
        print(f"\n{STREAMS} streams through 3 reloads: longest silence between events {longest:.3f}s")
        self.assertLess(longest, 5.0)
        self.assertTrue(self.gateway.poll() is None, "the gateway still runs")


class WorkersTests(ReloadBase):
    """workers = 2: the parent forwards the reload to both workers."""

    workers = 2

    def test_both_workers_reload(self) -> None:
        """POST /reload on the parent reaches both workers: each logs it, and the new route answers."""
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        status, body = post_json(self.admin, "/reload")
        self.assertEqual((status, body["status"], body["workers"]), (200, "reloaded", 2))

        def both_logged() -> bool:
            lines = [line for line in self.log().splitlines() if "reloaded" in line]
            return all(any(f"[worker-{i}" in line for line in lines) for i in (1, 2))

        self.wait_for(both_logged, "both workers' reload lines")
        self.assertEqual([self.status("/api/new/json") for _ in range(20)], [200] * 20)

    def test_sighup_to_the_parent(self) -> None:
        """SIGHUP to the parent (the pid file's) reloads both workers; an invalid file reaches neither."""
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)) + "[bogus]\n")
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.wait_for(lambda: "[bogus]: unknown section" in self.log(), "the refusal")
        self.assertEqual(self.status("/api/new/json"), 404)
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        os.kill(int(self.pidfile.read_text()), signal.SIGHUP)
        self.wait_for(lambda: sum("reloaded" in line and "[worker-" in line
                                  for line in self.log().splitlines()) >= 2, "both workers' reload lines")
        self.assertEqual([self.status("/api/new/json") for _ in range(20)], [200] * 20)


def served_serial(port: int, ca: str) -> int:
    """The serial of the certificate a new TLS connection to C{port} is served (verified against C{ca})."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class TlsReloadTests(ReloadBase):
    """
    C{listen = ssl:...}: certbot renews the key and certificate in place,
    SIGHUP, and new connections get the new certificate while an open SSE
    stream over TLS goes on.
    """

    #: A stream long enough to outlive the renewal and the reload.
    STREAM_EVENTS, STREAM_INTERVAL = 120, 0.05

    def setUp(self) -> None:
        from tests.tls_certs import make_pki

        self.pki = make_pki(Path(self.mktemp()).resolve())
        super().setUp()

    def text(self, extra: str = "") -> str:
        plain = f"listen = tcp:{self.listen}:interface=127.0.0.1\n"
        text = super().text(extra)
        assert plain in text
        return text.replace(plain, f"listen = ssl:{self.listen}:interface=127.0.0.1"
                                   f":privateKey={self.pki.server_key}:certKey={self.pki.server_cert}\n")

    def serial(self) -> int:
        """The serial a new connection is served now."""
        return served_serial(self.listen, self.pki.ca)

    def open_stream(self) -> SseClient:
        """An SSE stream over TLS (verifying the CA of the files, which a renewal keeps)."""
        import ssl

        client = SseClient(
            self.listen, f"/api/aura/stream?count={self.STREAM_EVENTS}&interval={self.STREAM_INTERVAL}",
            {"X-Tenant-ID": "t1", "Accept": "text/event-stream"},
            tls=ssl.create_default_context(cafile=self.pki.ca),
        )
        client.start()
        self.wait_for(lambda: len(client.indexes) >= 3, "the stream's first events")
        return client

    def renew(self) -> int:
        """New key and certificate files, in place (the CA kept); the new serial."""
        import shutil

        from tests.tls_certs import make_pki

        new = make_pki(Path(self.mktemp()).resolve())
        # The CA file too: the test's clients verify against the path they know.
        for source, target in ((new.server_key, self.pki.server_key), (new.server_cert, self.pki.server_cert),
                               (new.ca, self.pki.ca)):
            shutil.copyfile(source, target)
        from tests.test_tls_listen import serial_of

        return serial_of(self.pki.server_cert)

    def assert_stream_went_on(self, client: SseClient, at_reload: int) -> None:
        """C{client} got events after the reload, and all of them, to its end."""
        self.wait_for(lambda: len(client.indexes) > at_reload + 5, "events after the reload")
        client.join(60)
        self.assertIsNone(client.error)
        self.assertEqual(client.indexes, list(range(1, self.STREAM_EVENTS + 1)))
        self.assertTrue(client.done)

    def test_sighup_serves_renewed_certificate(self) -> None:
        """
        After the files are renewed and SIGHUP sent, a new connection is
        served the new certificate (its serial) while the stream opened
        before keeps receiving its events to the end; a key that is not the
        certificate's then keeps the renewed one, and POST /reload says so.
        """
        from tests.test_tls_listen import serial_of

        old = serial_of(self.pki.server_cert)
        self.assertEqual(self.serial(), old)
        client = self.open_stream()
        new = self.renew()
        self.assertNotEqual(new, old)
        os.kill(self.gateway.pid, signal.SIGHUP)
        at_reload = len(client.indexes)
        # Until the swap, the old certificate fails verification against the
        # renewed CA file: wait for the gateway to say it swapped, then look.
        self.wait_for(lambda: "new connections get the new certificate" in self.log(), "the swap")
        self.assertEqual(self.serial(), new)
        self.assert_stream_went_on(client, at_reload)

        from tests.tls_certs import make_pki

        Path(self.pki.server_key).write_bytes(Path(make_pki(Path(self.mktemp())).server_key).read_bytes())
        status, body = post_json(self.admin, "/reload")
        self.assertEqual((status, body["status"]), (200, "reloaded"))
        [problem] = body["tls_problems"]
        self.assertIn(f"{self.pki.server_key}: this key is not the one", problem)
        self.assertEqual(self.serial(), new)
        self.assertIn("the certificate in use stays", self.log())


class TlsWorkersReloadTests(TlsReloadTests):
    """The same with C{workers = 2}: both workers, and a worker restarted later, serve the renewed certificate."""

    workers = 2

    def worker_pids(self) -> list[int]:
        from tests.integration.upstreams import get_json

        return [w["pid"] for w in get_json(f"http://127.0.0.1:{self.admin}/healthz")["workers"] if w["alive"]]

    def alone(self, pid: int) -> Any:
        """A context in which only C{pid} of the workers accepts (the others frozen by SIGSTOP)."""
        from contextlib import contextmanager

        from tests.integration.test_workers import state

        @contextmanager
        def frozen() -> Any:
            others = [p for p in self.worker_pids() if p != pid]
            for other in others:
                os.kill(other, signal.SIGSTOP)
                self.wait_for(lambda: state(other) in ("T", "t"), f"pid {other} stopped")
            try:
                yield
            finally:
                for other in others:
                    os.kill(other, signal.SIGCONT)

        return frozen()

    def test_sighup_serves_renewed_certificate(self) -> None:
        """
        After renewal and SIGHUP to the parent, each worker alone (the other
        frozen) serves the new certificate, the open stream goes on; a
        worker killed and restarted later serves the parent's certificate,
        not files changed since without a reload.
        """
        from tests.test_tls_listen import serial_of

        old = serial_of(self.pki.server_cert)
        client = self.open_stream()
        new = self.renew()
        os.kill(self.gateway.pid, signal.SIGHUP)
        at_reload = len(client.indexes)
        self.wait_for(lambda: sum("new connections get the new certificate" in line and "[worker-" in line
                                  for line in self.log().splitlines()) >= 2, "both workers' new certificate")
        first, second = self.worker_pids()
        for pid in (first, second):
            with self.alone(pid):
                self.assertEqual([self.serial() for _ in range(3)], [new] * 3, f"worker pid {pid}")
        self.assertNotEqual(new, old)
        self.assert_stream_went_on(client, at_reload)

        # Files renewed again, no reload: a restarted worker still serves
        # what the parent read (the same as its sibling), not these files.
        self.renew()
        os.kill(first, signal.SIGKILL)

        def restarted_pid() -> Optional[int]:
            # One /healthz read: the new worker, once both slots run again.
            pids = self.worker_pids()
            new = [p for p in pids if p not in (first, second)]
            return new[0] if len(pids) == 2 and len(new) == 1 else None

        self.wait_for(lambda: restarted_pid() is not None, "the restart")
        restarted = restarted_pid()
        self.assertIsNotNone(restarted, self.log()[-3000:])
        assert restarted is not None
        with self.alone(restarted):
            self.assertEqual(self.serial_unverified(), new)

    def serial_unverified(self) -> int:
        """The served serial, trusting nothing (the CA file now belongs to files not loaded)."""
        import socket
        import ssl

        from cryptography import x509

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.listen), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number
