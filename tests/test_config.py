"""Tests for L{aura_proxy.config} and the C{python -m aura_proxy check} command."""

from __future__ import annotations

import base64
import io
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import TestCase

from aura_proxy.__main__ import check_command, main
from aura_proxy.config import ConfigError, default_config_text, load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "aura-proxy.ini")

MINIMAL = """
[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:9000
"""


def problems(text: str) -> list[str]:
    try:
        parse_config(text, "gw.ini")
    except ConfigError as e:
        return e.problems
    raise AssertionError("configuration was accepted")


class DefaultsTests(TestCase):
    """The embedded defaults and the shipped file."""

    def test_embedded_defaults_equal_shipped_file(self) -> None:
        """The embedded defaults are byte for byte etc/aura-proxy.ini."""
        with open(SHIPPED, encoding="utf-8") as f:
            self.assertEqual(default_config_text(), f.read())

    def test_defaults_values(self) -> None:
        """The defaults carry the documented values: ports, timeouts, the Aura route, the contract."""
        config = load_config(None)
        g = config.gateway
        self.assertEqual(
            (g.listen, g.admin_listen, g.connect_timeout, g.response_timeout, g.idle_timeout,
             g.heartbeat_interval, g.max_request_body),
            (("tcp:8080:backlog=4096",), "tcp:8081:interface=127.0.0.1", 10.0, 300.0, 300.0, 15.0,
             10485760),
        )
        self.assertEqual([(r.name, r.pattern.text, str(r.upstream)) for r in config.routes],
                         [("aura", "/api/aura/**", "http://127.0.0.1:9000")])
        self.assertEqual(config.headers.required, ("X-Tenant-ID",))
        self.assertEqual(
            dict(config.headers.defaults),
            {"X-DWP-Source": "FRONTEND", "X-DWP-Caller-Type": "USER"},
        )
        self.assertEqual([p.text for p in config.headers.public_paths],
                         ["/api/auth/login", "/api/monitoring/**"])
        self.assertEqual(config.cors.allowed_origins, ("http://localhost:3000",))
        self.assertIn("Last-Event-ID", config.cors.allowed_headers)
        self.assertTrue(config.cors.allow_credentials)
        self.assertEqual(config.cors.max_age, 3600)

    def test_listen_backlog(self) -> None:
        """A tcp: listener gets a deep listen queue unless it names its own backlog."""
        def listen(value: str) -> tuple[str, ...]:
            return parse_config(f"[gateway]\nlisten = {value}\n" + MINIMAL, "x").gateway.listen

        self.assertEqual(listen("tcp:1"), ("tcp:1:backlog=4096",))
        self.assertEqual(listen("tcp:1:backlog=10"), ("tcp:1:backlog=10",))
        self.assertEqual(listen("unix:/tmp/s"), ("unix:/tmp/s",))

    def test_shipped_file_checks(self) -> None:
        """C{python -m aura_proxy check etc/aura-proxy.ini} accepts the shipped file."""
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main(["check", SHIPPED]), 0)
        self.assertIn("OK", out.getvalue())


class ProblemTests(TestCase):
    """Every mistake is reported, naming file, section and key."""

    def test_unknown_key(self) -> None:
        """An unknown key names file, section and key."""
        found = problems(MINIMAL + "[gateway]\nlisten_port = 8080\n")
        self.assertEqual(len(found), 1)
        self.assertTrue(found[0].startswith("gw.ini: [gateway] listen_port: unknown key"), found)

    def test_bad_values(self) -> None:
        """Bad numbers, booleans, endpoints and URLs are each reported."""
        found = problems(
            "[gateway]\nconnect_timeout = soon\nmax_request_body = -1\nlisten = nonsense:1\n"
            "[cors]\nallow_credentials = maybe\n"
            "[route:x]\npath = api/x\nupstream = ftp://host\n"
        )
        keys = sorted(line.split(": ")[1] for line in found)
        self.assertEqual(
            keys,
            sorted([
                "[gateway] connect_timeout", "[gateway] max_request_body", "[gateway] listen",
                "[cors] allow_credentials", "[route:x] path", "[route:x] upstream",
            ]),
        )

    def test_drain_timeout(self) -> None:
        """[gateway] drain_timeout is 30 s by default, takes 0 (end streams at once), refuses a negative or a word."""
        self.assertEqual(load_config(None).gateway.drain_timeout, 30.0)
        self.assertEqual(parse_config("[gateway]\ndrain_timeout = 0\n" + MINIMAL, "gw.ini").gateway.drain_timeout, 0.0)
        for bad in ("-1", "soon"):
            found = problems(f"[gateway]\ndrain_timeout = {bad}\n")
            self.assertTrue(any(line.startswith("gw.ini: [gateway] drain_timeout: ") for line in found), found)

    def test_duplicate_route(self) -> None:
        """Two routes with the same path are refused, naming both sections."""
        found = problems(MINIMAL + "[route:again]\npath = /api/aura/**\nupstream = http://h:1\n")
        self.assertEqual(len(found), 1)
        self.assertIn("[route:again] path: duplicate route", found[0])
        self.assertIn("[route:aura]", found[0])

    def test_route_without_upstream(self) -> None:
        """A route with no upstream names the missing key."""
        found = problems("[route:x]\npath = /x/**\n")
        self.assertEqual(found, ["gw.ini: [route:x] upstream: missing (every route needs path and upstream)"])

    def test_cors_any_origin_with_credentials_refused(self) -> None:
        """
        allowed_origins = * with allow_credentials = true (the default) is
        refused naming the key and both fixes; with credentials off it is
        accepted.
        """
        [found] = problems(MINIMAL + "[cors]\nallowed_origins = *\n")
        self.assertIn("gw.ini: [cors] allowed_origins:", found)
        self.assertIn("allow_credentials = false", found)
        config = parse_config(MINIMAL + "[cors]\nallowed_origins = *\nallow_credentials = false\n", "gw.ini")
        self.assertEqual(config.cors.allowed_origins, ("*",))

    def test_cors_allowed_headers_default(self) -> None:
        """allowed_headers left out: the contract's headers; set (even empty): exactly what is set."""
        config = parse_config(MINIMAL, "gw.ini")
        self.assertIn("X-Tenant-ID", config.cors.allowed_headers)
        self.assertIn("Last-Event-ID", config.cors.allowed_headers)
        config = parse_config(MINIMAL + "[cors]\nallowed_headers = X-A\n", "gw.ini")
        self.assertEqual(config.cors.allowed_headers, ("X-A",))
        config = parse_config(MINIMAL + "[cors]\nallowed_headers =\n", "gw.ini")
        self.assertEqual(config.cors.allowed_headers, ())

    def test_trusted_proxies(self) -> None:
        """trusted_proxies takes addresses and CIDR blocks (default none); anything else names the key."""
        self.assertEqual(parse_config(MINIMAL, "gw.ini").gateway.trusted_proxies, ())
        config = parse_config("[gateway]\ntrusted_proxies = 10.0.0.5, 10.0.0.0/8, fd00::/8\n" + MINIMAL,
                              "gw.ini")
        self.assertEqual([str(n) for n in config.gateway.trusted_proxies],
                         ["10.0.0.5/32", "10.0.0.0/8", "fd00::/8"])
        [found] = problems("[gateway]\ntrusted_proxies = 10.0.0.0/8, lb.example\n" + MINIMAL)
        self.assertIn("gw.ini: [gateway] trusted_proxies:", found)
        self.assertIn("'lb.example'", found)

    def test_max_identity_length(self) -> None:
        """[headers] max_identity_length is a whole number >= 1, default 128."""
        self.assertEqual(parse_config(MINIMAL, "gw.ini").headers.max_identity_length, 128)
        [found] = problems(MINIMAL + "[headers]\nmax_identity_length = 0\n")
        self.assertIn("gw.ini: [headers] max_identity_length:", found)

    def test_metrics_section(self) -> None:
        """[metrics]: enabled (default true) and stall_after (seconds > 0, default 15); mistakes name the key."""
        metrics = parse_config(MINIMAL, "gw.ini").metrics
        self.assertEqual((metrics.enabled, metrics.stall_after), (True, 15.0))
        metrics = parse_config(MINIMAL + "[metrics]\nenabled = off\nstall_after = 2.5\n", "gw.ini").metrics
        self.assertEqual((metrics.enabled, metrics.stall_after), (False, 2.5))
        [found] = problems(MINIMAL + "[metrics]\nstall_after = 0\n")
        self.assertIn("gw.ini: [metrics] stall_after:", found)
        [found] = problems(MINIMAL + "[metrics]\nenable = true\n")
        self.assertIn("gw.ini: [metrics] enable: unknown key", found)

    def test_unknown_section(self) -> None:
        """A misspelt section is an error, not silently ignored."""
        found = problems(MINIMAL + "[cros]\nallowed_origins = *\n")
        self.assertEqual(len(found), 1)
        self.assertIn("[cros]: unknown section", found[0])

    def test_duplicate_key(self) -> None:
        """A key given twice in a section names the section, key and line."""
        found = problems("[gateway]\nlisten = tcp:1\nlisten = tcp:2\n")
        self.assertEqual(len(found), 1)
        self.assertIn("gw.ini: [gateway] listen: duplicate key (line 3)", found[0])

    def test_bad_default_header_name(self) -> None:
        """A default header with an invalid name is reported under its key."""
        found = problems(MINIMAL + "[headers]\ndefault.Bad Name = x\n")
        self.assertEqual(len(found), 1)
        self.assertIn("[headers] default.Bad Name", found[0])

    def test_double_star_only_at_end(self) -> None:
        """C{**} before the end of a pattern is refused."""
        found = problems("[route:x]\npath = /a/**/b\nupstream = http://h:1\n")
        self.assertIn("'**' may only end a pattern", found[0])

    def test_check_command_reports_and_fails(self) -> None:
        """C{check} prints every problem to stderr and exits 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[gateway]\nidle_timeout = 0\nbogus = 1\n" + MINIMAL)
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main(["check", path]), 1)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.startswith(path + ": [gateway] ") for line in lines), lines)

    def test_unreadable_file(self) -> None:
        """A file that cannot be read is a configuration error naming it."""
        with self.assertRaises(ConfigError) as caught:
            load_config("/nonexistent/aura.ini")
        self.assertIn("/nonexistent/aura.ini: cannot read", str(caught.exception))

    def test_check_usage(self) -> None:
        """Without a subcommand the command prints its usage and exits 2."""
        with redirect_stderr(io.StringIO()):
            self.assertEqual(main([]), 2)


class NoRouteTests(TestCase):
    """A configuration without any route can serve nothing: refused like any other mistake."""

    def test_refused(self) -> None:
        """Without a [route:NAME] section the file is refused, naming file and section."""
        found = problems("[gateway]\nlisten = tcp:8080\n")
        self.assertEqual(found, [
            "gw.ini: [route:NAME]: no route: every request would be answered 404 (add at least "
            "one [route:NAME] section with path and upstream)"
        ])

    def test_invalid_routes_not_reported_twice(self) -> None:
        """A route section that is itself wrong is reported under its own name, not as "no route"."""
        found = problems("[route:lonely]\npath = /api/lonely/**\n")
        self.assertEqual(found, ["gw.ini: [route:lonely] upstream: missing (every route needs path and upstream)"])

    def test_check_refuses(self) -> None:
        """C{check} no longer answers "OK (0 routes)": it prints the problem and exits 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[gateway]\nlisten = tcp:8080\n")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main(["check", path]), 1)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(err.getvalue(), f"{path}: [route:NAME]: no route: every request would be answered "
                         "404 (add at least one [route:NAME] section with path and upstream)\n")


class CheckCommandTests(TestCase):
    """The installed C{aura-proxy-check FILE [FILE...]} command."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_files_without_subcommand(self) -> None:
        """C{aura-proxy-check FILE FILE} checks the files (it once printed its usage)."""
        good, bad = self.write(MINIMAL), self.write(MINIMAL + "[gateway]\nbogus = 1\n")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(check_command([good]), 0)
            self.assertEqual(check_command([good, bad]), 1)
        self.assertEqual(out.getvalue(), f"{good}: OK (1 routes)\n" * 2)
        self.assertIn(f"{bad}: [gateway] bogus: unknown key", err.getvalue())

    def test_old_form_accepted(self) -> None:
        """C{aura-proxy-check check FILE}, the form it used to need, still works."""
        with redirect_stdout(io.StringIO()):
            self.assertEqual(check_command(["check", self.write(MINIMAL)]), 0)

    def test_usage(self) -> None:
        """Without a file: its own usage on stderr, exit 2; with C{--help}: on stdout, exit 0."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(check_command([]), 2)
            self.assertEqual(check_command(["--help"]), 0)
        self.assertEqual(err.getvalue(), "usage: aura-proxy-check FILE [FILE...]\n")
        self.assertEqual(out.getvalue(), "usage: aura-proxy-check FILE [FILE...]\n")


class WorkersKeyTests(TestCase):
    """C{[gateway] workers}: parsed here, refused with what it cannot share (more in test_workers)."""

    def test_default_one(self) -> None:
        """The shipped defaults run one process."""
        self.assertEqual(load_config(None).gateway.workers, 1)

    def test_bad_value_named(self) -> None:
        """A value that is neither a whole number >= 1 nor auto names file, section and key."""
        found = problems(MINIMAL + "[gateway]\nworkers = zero\n")
        self.assertEqual(found, ["gw.ini: [gateway] workers: expected a whole number >= 1 or auto, got 'zero'"])

    def test_memory_resume_refused(self) -> None:
        """workers > 1 with the default [sse] resume = memory is refused, naming the key."""
        found = problems(MINIMAL + "[gateway]\nworkers = 2\n")
        self.assertEqual(len(found), 1)
        self.assertTrue(found[0].startswith("gw.ini: [gateway] workers: workers = 2 cannot be used "
                                            "with [sse] resume = memory"), found)

    def test_tcp_or_ssl_required(self) -> None:
        """workers > 1 with a unix: listen is refused, naming [gateway] listen."""
        found = problems(MINIMAL + "[gateway]\nworkers = 2\nlisten = unix:/tmp/gw.sock\n[sse]\nresume = off\n")
        self.assertEqual(len(found), 1)
        self.assertTrue(found[0].startswith("gw.ini: [gateway] listen: workers = 2 needs tcp: or ssl: endpoints"),
                        found)

    def test_check_command_reports_workers(self) -> None:
        """C{python -m aura_proxy check} reports the refusal like any other mistake."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(MINIMAL + "[gateway]\nworkers = 3\n")
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main(["check", path]), 1)
        self.assertIn(f"{path}: [gateway] workers: workers = 3 cannot be used with [sse] resume = memory",
                      err.getvalue())


class FastPathTests(TestCase):
    """C{[gateway] fast_path}, and the environment variable that overrides it."""

    def setUp(self) -> None:
        saved = os.environ.pop("AURA_PROXY_FAST_PATH", None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "AURA_PROXY_FAST_PATH", saved)
        self.addCleanup(os.environ.pop, "AURA_PROXY_FAST_PATH", None)

    def test_default_on(self) -> None:
        """The fast paths are on unless the file says off."""
        self.assertTrue(parse_config(MINIMAL, "gw.ini").gateway.fast_path)
        self.assertFalse(parse_config("[gateway]\nfast_path = off\n" + MINIMAL, "gw.ini").gateway.fast_path)

    def test_bad_value(self) -> None:
        """A value other than on/off is refused with file, section and key."""
        [problem] = problems("[gateway]\nfast_path = fast\n" + MINIMAL)
        self.assertTrue(problem.startswith("gw.ini: [gateway] fast_path: "), problem)

    def test_environment_overrides(self) -> None:
        """AURA_PROXY_FAST_PATH=off switches a file's fast_path = on off, and =on the other way."""
        os.environ["AURA_PROXY_FAST_PATH"] = "off"
        self.assertFalse(parse_config("[gateway]\nfast_path = on\n" + MINIMAL, "gw.ini").gateway.fast_path)
        os.environ["AURA_PROXY_FAST_PATH"] = "on"
        self.assertTrue(parse_config("[gateway]\nfast_path = off\n" + MINIMAL, "gw.ini").gateway.fast_path)

    def test_environment_bad_value(self) -> None:
        """A bad AURA_PROXY_FAST_PATH is a configuration error naming the variable."""
        os.environ["AURA_PROXY_FAST_PATH"] = "maybe"
        [problem] = problems(MINIMAL)
        self.assertEqual(problem, "gw.ini: environment AURA_PROXY_FAST_PATH: expected true or false, got 'maybe'")


class UpstreamTrustConfigTests(TestCase):
    """The C{[upstream_trust]} section."""

    def key_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_off_by_default(self) -> None:
        """Without a key file nothing is signed: no keys."""
        config = parse_config(MINIMAL, "gw.ini")
        self.assertEqual((config.upstream_trust.key_file, config.upstream_trust.keys), ("", ()))
        self.assertEqual(load_config(None).upstream_trust.keys, ())

    def test_keys_read_at_load(self) -> None:
        """The key file is read when the configuration is: current key first."""
        from aura_proxy.upstream_trust import TrustKey

        current, previous = b"c" * 32, b"p" * 48
        path = self.key_file(
            f"# current\n{base64.b64encode(current).decode()}\n{base64.b64encode(previous).decode()}\n")
        config = parse_config(MINIMAL + f"[upstream_trust]\nkey_file = {path}\n", "gw.ini")
        self.assertEqual(config.upstream_trust.key_file, path)
        self.assertEqual(config.upstream_trust.keys, (TrustKey.of(current), TrustKey.of(previous)))

    def test_unusable_key_file(self) -> None:
        """A missing file or a short key is a configuration error naming the key and the file."""
        missing = self.mktemp()
        [found] = problems(MINIMAL + f"[upstream_trust]\nkey_file = {missing}\n")
        self.assertTrue(found.startswith(f"gw.ini: [upstream_trust] key_file: {missing}: cannot read"), found)
        short = self.key_file(base64.b64encode(b"s" * 16).decode() + "\n")
        [found] = problems(MINIMAL + f"[upstream_trust]\nkey_file = {short}\n")
        self.assertEqual(
            found,
            f"gw.ini: [upstream_trust] key_file: {short}: line 1: a key of 16 bytes, at least 32 are needed",
        )

    def test_unknown_key(self) -> None:
        """A misspelt key of the section is an error."""
        [found] = problems(MINIMAL + "[upstream_trust]\nkeyfile = x\n")
        self.assertIn("[upstream_trust] keyfile: unknown key", found)


class LogConfigTests(TestCase):
    """The C{[log]} section (the access log) and the deprecated C{[gateway] access_log}."""

    def test_defaults(self) -> None:
        """Without [log]: the access log on stdout, as text; nothing deprecated."""
        config = parse_config(MINIMAL, "gw.ini")
        self.assertEqual((config.log.access, config.log.format), ("stdout", "text"))
        self.assertEqual(config.deprecations, ())
        shipped = load_config(None)
        self.assertEqual((shipped.log.access, shipped.log.format, shipped.deprecations), ("stdout", "text", ()))

    def test_values(self) -> None:
        """access is off, stdout or a file in an existing directory; format json or text."""
        path = os.path.join(self.mktemp() + "-dir", "access.log")
        os.makedirs(os.path.dirname(path))
        for access in ("off", "stdout", path):
            for fmt in ("json", "text"):
                config = parse_config(MINIMAL + f"[log]\naccess = {access}\nformat = {fmt}\n", "gw.ini")
                self.assertEqual((config.log.access, config.log.format), (access, fmt))

    def test_bad_values(self) -> None:
        """A boolean, nothing, a missing directory, a directory or an unknown format: errors naming [log] and the key."""
        missing = os.path.join(self.mktemp(), "nope", "access.log")
        for value, words in (("true", "expected off, stdout or the path"), ("", "got nothing"),
                             (missing, "does not exist"), (ROOT, "is a directory")):
            [problem] = problems(MINIMAL + f"[log]\naccess = {value}\n")
            self.assertTrue(problem.startswith("gw.ini: [log] access: "), problem)
            self.assertIn(words, problem)
        [problem] = problems(MINIMAL + "[log]\nformat = xml\n")
        self.assertTrue(problem.startswith("gw.ini: [log] format: "), problem)

    def test_old_access_log_key(self) -> None:
        """
        [gateway] access_log is still read, true as access = stdout and false
        as off, with a deprecation line naming the file, the old key and the new one.
        """
        for old, new in (("true", "stdout"), ("false", "off")):
            config = parse_config(f"[gateway]\naccess_log = {old}\n" + MINIMAL, "gw.ini")
            self.assertEqual(config.log.access, new)
            [line] = config.deprecations
            self.assertTrue(line.startswith("gw.ini: [gateway] access_log is deprecated"), line)
            self.assertIn(f"[log] access = {new}", line)

    def test_old_and_new_key(self) -> None:
        """[gateway] access_log next to [log] access is refused: which one wins would be a guess."""
        [problem] = problems(f"[gateway]\naccess_log = true\n[log]\naccess = off\n" + MINIMAL)
        self.assertTrue(problem.startswith("gw.ini: [gateway] access_log: replaced by [log] access"), problem)

    def test_check_command_warns(self) -> None:
        """The check command accepts a file with the old key, with the deprecation as a warning on stderr."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[gateway]\naccess_log = false\n" + MINIMAL)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(check_command([path]), 0)
        self.assertIn("OK", out.getvalue())
        self.assertIn(f"warning: {path}: [gateway] access_log is deprecated", err.getvalue())


class AdminConfigTests(TestCase):
    """The C{[admin]} section: the admin token file, read with the configuration."""

    def token_file(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_no_token(self) -> None:
        """Without token_file (or empty), no token is asked."""
        self.assertIsNone(parse_config(MINIMAL, "gw.ini").admin.token)
        self.assertIsNone(parse_config(MINIMAL + "[admin]\ntoken_file =\n", "gw.ini").admin.token)

    def test_token(self) -> None:
        """The file's token is read at load time, its line break dropped, and kept out of repr."""
        path = self.token_file(b"0123456789abcdef-token\n")
        config = parse_config(MINIMAL + f"[admin]\ntoken_file = {path}\n", "gw.ini")
        self.assertEqual((config.admin.token_file, config.admin.token), (path, b"0123456789abcdef-token"))
        self.assertNotIn("0123456789abcdef", repr(config))

    def test_bad_token_files(self) -> None:
        """A missing file, a short token or one with spaces: an error naming file, [admin] and token_file."""
        missing = os.path.join(self.mktemp(), "token")
        for path, words in ((missing, "cannot read"), (self.token_file(b"short\n"), "at least 16"),
                            (self.token_file(b""), "0 bytes"),
                            (self.token_file(b"two words in one long token\n"), "without spaces")):
            [problem] = problems(MINIMAL + f"[admin]\ntoken_file = {path}\n")
            self.assertTrue(problem.startswith("gw.ini: [admin] token_file: "), problem)
            self.assertIn(words, problem)
