"""
The TLS of the gateway's C{ssl:} listeners, reloadable.

An C{ssl:PORT:privateKey=KEY:certKey=CERT[:extraCertChain=CHAIN]...}
endpoint of C{[gateway] listen} (Twisted's syntax and defaults) serves TLS,
offering h2 and http/1.1 by ALPN (the site says which; Twisted's ALPN
callback asks it per connection), through a L{SwappableContext}: a reload
(L{ListenerCertificates.reload}) reads the files again and swaps the
context, so new connections get the new certificate while connections
already open keep theirs (each holds the context it was made with).  Files
that cannot be loaded (missing, unreadable, a key that is not the
certificate's) leave the certificate in use, and the problem is logged and
returned, naming the listener and the file.

With C{workers > 1} the parent reads the files (L{read_pems}: at start, as
the user twistd starts as, and at each reload) and hands the bytes to every
worker (L{aura_proxy.workers.tls_frame}), which builds its contexts from them
(L{ListenerCertificates.use}) and never opens the key files itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from OpenSSL import SSL
from twisted.application.internet import TCPServer
from twisted.application.service import IService
from twisted.internet.interfaces import ILoggingContext, IOpenSSLContextFactory, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from aura_proxy.descriptions import split_description

if TYPE_CHECKING:
    from twisted.internet.ssl import CertificateOptions

__all__ = [
    "ListenerCertificate",
    "ListenerCertificates",
    "SslListen",
    "SwappableContext",
    "TlsFileError",
    "TlsPems",
    "certificate_options",
    "is_ssl",
    "parse_ssl_listen",
    "read_pems",
    "tls_factory",
    "tls_server",
]

log = Logger("aura_proxy.tls_listen")

#: The positional arguments of an ssl: description, in Twisted's order (its _parseSSL).
_SSL_ARGUMENTS = (
    "port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters",
)
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def is_ssl(description: str) -> bool:
    """Whether C{description} is an C{ssl:} endpoint."""
    return description.split(":", 1)[0] == "ssl"


@dataclass(frozen=True)
class SslListen:
    """An C{ssl:} listen description, parsed (its files not read)."""

    description: str
    port: int
    interface: str
    backlog: int
    private_key: str
    #: The certificate's file (Twisted's default: the key's file).
    cert_key: str
    extra_cert_chain: Optional[str] = None
    dh_parameters: Optional[str] = None
    #: A name in C{OpenSSL.SSL} (C{sslmethod}), or None: Twisted's default.
    method: Optional[str] = None


def parse_ssl_listen(description: str) -> SslListen:
    """
    Parse an C{ssl:} endpoint description as Twisted does, without reading
    its files.

    @raise ValueError: naming what is wrong with it.
    """
    positional, named = split_description(description, "ssl")
    if len(positional) > len(_SSL_ARGUMENTS):
        raise ValueError(f"too many arguments in {description!r}")
    args = dict(zip(_SSL_ARGUMENTS, positional))
    for key, value in named.items():
        if key not in _SSL_ARGUMENTS:
            raise ValueError(f"unknown argument {key!r} in {description!r} (known: {', '.join(_SSL_ARGUMENTS)})")
        if key in args:
            raise ValueError(f"{key!r} given twice in {description!r}")
        args[key] = value
    if "port" not in args:
        raise ValueError(f"no port in {description!r}")
    method = args.get("sslmethod")
    if method is not None and not isinstance(getattr(SSL, method, None), int):
        raise ValueError(f"unknown sslmethod {method!r} in {description!r}")
    private_key = args.get("privateKey", "server.pem")
    try:
        port, backlog = int(args["port"]), int(args.get("backlog", "50"))
    except ValueError as e:
        raise ValueError(f"{description!r}: {e}") from None
    return SslListen(
        description, port, args.get("interface", ""), backlog, private_key,
        args.get("certKey", private_key), args.get("extraCertChain"), args.get("dhParameters"), method,
    )


@dataclass(frozen=True)
class TlsPems:
    """The bytes of one C{ssl:} listener's key, certificate and chain files."""

    key: bytes
    cert: bytes
    chain: Optional[bytes] = None

    def to_json(self) -> dict[str, Optional[str]]:
        """As JSON strings (PEM is ASCII)."""
        return {
            "key": self.key.decode("ascii"), "cert": self.cert.decode("ascii"),
            "chain": None if self.chain is None else self.chain.decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Optional[str]]) -> "TlsPems":
        """What L{to_json} gave."""
        chain = data.get("chain")
        return cls(
            str(data["key"]).encode("ascii"), str(data["cert"]).encode("ascii"),
            None if chain is None else chain.encode("ascii"),
        )


class TlsFileError(Exception):
    """An C{ssl:} listener's file cannot be read or used; C{str} names listener, file and why."""

    def __init__(self, listen: SslListen, path: str, why: str) -> None:
        super().__init__(f"{listen.description!r}: {path}: {why}")
        self.listen = listen
        self.path = path
        self.why = why


def _read(listen: SslListen, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsFileError(listen, path, f"cannot read ({e.strerror or e})") from None


def read_pems(listen: SslListen) -> TlsPems:
    """
    Read the files of C{listen} (nothing is checked but that they can be read).

    @raise TlsFileError: for the first that cannot.
    """
    key = _read(listen, listen.private_key)
    cert = key if listen.cert_key == listen.private_key else _read(listen, listen.cert_key)
    chain = None if listen.extra_cert_chain is None else _read(listen, listen.extra_cert_chain)
    return TlsPems(key, cert, chain)


def certificate_options(listen: SslListen, pems: TlsPems) -> "CertificateOptions":
    """
    The TLS settings Twisted's C{ssl:} endpoint makes of these files, from
    their bytes, with the context already made (so a key that is not the
    certificate's fails here, not at the first handshake).

    @raise TlsFileError: naming the file that cannot be used.
    """
    from OpenSSL.crypto import FILETYPE_PEM
    from twisted.internet.ssl import Certificate, CertificateOptions, DiffieHellmanParameters, KeyPair
    from twisted.python.filepath import FilePath

    try:
        certificate = Certificate.loadPEM(pems.cert)
    except Exception as e:
        raise TlsFileError(listen, listen.cert_key, f"not a PEM certificate ({e or type(e).__name__})") from None
    try:
        key = KeyPair.load(pems.key, FILETYPE_PEM)
    except Exception as e:
        raise TlsFileError(listen, listen.private_key, f"not a PEM private key ({e or type(e).__name__})") from None
    if not key.matches(certificate.getPublicKey()):
        raise TlsFileError(
            listen, listen.private_key, f"this key is not the one of the certificate in {listen.cert_key}"
        )
    chain = None
    if listen.extra_cert_chain is not None:
        try:
            chain = [Certificate.loadPEM(block).original for block in _PEM_CERTIFICATE.findall(pems.chain or b"")]
        except Exception as e:
            raise TlsFileError(listen, listen.extra_cert_chain, f"bad PEM certificate ({e})") from None
        if not chain:
            raise TlsFileError(listen, listen.extra_cert_chain, "holds no PEM certificate")
    extra: dict[str, Any] = {}
    if listen.method is not None:
        extra["method"] = getattr(SSL, listen.method)
    if listen.dh_parameters is not None:
        # Not secret: read by whoever makes the context (each worker too).
        extra["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(listen.dh_parameters))
    options = CertificateOptions(
        privateKey=key.original, certificate=certificate.original, extraCertChain=chain,
        acceptableProtocols=_alpn_protocols(), **extra
    )
    try:
        options.getContext()
    except Exception as e:
        raise TlsFileError(listen, listen.cert_key, f"cannot be used with {listen.private_key} ({e})") from None
    return options


@implementer(IOpenSSLContextFactory)
class SwappableContext:
    """
    The TLS context of one listener's new connections: Twisted's
    L{TLSMemoryBIOFactory} asks C{getContext} for each connection it
    accepts, so replacing C{options} changes the certificate of the next
    connection and of no open one.
    """

    def __init__(self, options: "CertificateOptions") -> None:
        #: The settings new connections are made with.
        self.options = options

    def getContext(self) -> SSL.Context:
        """The current settings' context (made once per settings, then shared)."""
        return self.options.getContext()


def _describe(options: "CertificateOptions") -> str:
    certificate = options.certificate
    if certificate is None:
        return "no certificate"
    subject = dict(certificate.get_subject().get_components()).get(b"CN", b"?").decode("utf-8", "replace")
    return f"serial {certificate.get_serial_number():x}, CN={subject}, not after {certificate.get_notAfter()!r}"


class ListenerCertificate:
    """
    One C{ssl:} listener's certificate: the context its new connections use
    (L{context}) and the bytes it was made from.

    @raise TlsFileError: if C{pems} cannot be used.
    """

    def __init__(self, listen: SslListen, pems: TlsPems) -> None:
        self.listen = listen
        self.pems = pems
        self.context = SwappableContext(certificate_options(listen, pems))

    def use(self, pems: TlsPems) -> bool:
        """
        Make new connections use C{pems}; whether they differ from those in use.

        @raise TlsFileError: if they cannot be used (the old ones stay).
        """
        if pems == self.pems:
            return False
        options = certificate_options(self.listen, pems)
        self.context.options, self.pems = options, pems
        log.info(
            "{listener}: new connections get the new certificate ({certificate}); open ones keep theirs",
            listener=self.listen.description, certificate=_describe(options),
        )
        return True

    def __repr__(self) -> str:
        return f"<ListenerCertificate {self.listen.description!r}: {_describe(self.context.options)}>"


class ListenerCertificates:
    """The certificates of one process's C{ssl:} listeners, by description."""

    def __init__(self, certificates: Iterable[ListenerCertificate] = ()) -> None:
        self._by_description = {c.listen.description: c for c in certificates}

    @classmethod
    def load(
        cls, descriptions: Iterable[str], pems: Optional[Mapping[str, TlsPems]] = None
    ) -> "ListenerCertificates":
        """
        The certificates of the C{ssl:} ones of C{descriptions}, from C{pems}
        where it has a description's bytes, else from its files.

        @raise TlsFileError: for the first that cannot be loaded.
        """
        certificates = []
        for description in descriptions:
            if is_ssl(description):
                listen = parse_ssl_listen(description)
                given = None if pems is None else pems.get(description)
                certificates.append(ListenerCertificate(listen, given if given is not None else read_pems(listen)))
        return cls(certificates)

    def __bool__(self) -> bool:
        return bool(self._by_description)

    def __getitem__(self, description: str) -> ListenerCertificate:
        return self._by_description[description]

    def pems(self) -> dict[str, TlsPems]:
        """The bytes in use, by description (what the parent hands its workers)."""
        return {d: c.pems for d, c in self._by_description.items()}

    def reload(self) -> tuple[str, ...]:
        """
        Read every listener's files again and use them for new connections;
        a listener whose files cannot be used keeps its certificate.

        @return: one line per listener left as it was, naming it and the file.
        """
        return self._swap({d: None for d in self._by_description})

    def use(self, pems: Mapping[str, TlsPems]) -> tuple[str, ...]:
        """Like L{reload}, with the bytes given (a worker's, from its parent) instead of the files."""
        return self._swap({d: p for d, p in pems.items() if d in self._by_description})

    def _swap(self, pems: Mapping[str, Optional[TlsPems]]) -> tuple[str, ...]:
        problems = []
        for description, given in pems.items():
            certificate = self._by_description[description]
            try:
                certificate.use(given if given is not None else read_pems(certificate.listen))
            except TlsFileError as e:
                log.error(
                    "{listener}: the certificate in use stays, new files not loaded: {path}: {why}",
                    listener=description, path=e.path, why=e.why,
                )
                problems.append(str(e))
        return tuple(problems)


def _alpn_protocols() -> list[bytes]:
    """What the site speaks, for ALPN: h2 (with the h2 package), then http/1.1."""
    from twisted.web.http import H2_ENABLED

    return [b"h2", b"http/1.1"] if H2_ENABLED else [b"http/1.1"]


@implementer(IProtocolFactory, ILoggingContext)
class _SiteBehindTls:
    """
    The site as TLS wraps it, without the site's ALPN interface: the
    protocols are the context's, set when it is made (L{certificate_options}).
    Twisted before 24.7 sets them again on the shared context for every
    connection when the wrapped factory offers them, which pyOpenSSL refuses
    once the context has made a connection ("cannot be mutated again").
    """

    def __init__(self, site: IProtocolFactory) -> None:
        #: The site served.
        self.site = site

    def buildProtocol(self, addr: Any) -> Any:
        return self.site.buildProtocol(addr)

    def doStart(self) -> None:
        # The site counts its ports (readiness: listening).
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.site, "logPrefix", None)
        return prefix() if callable(prefix) else type(self.site).__name__


def tls_factory(
    certificate: ListenerCertificate, site: IProtocolFactory, clock: Optional[Any] = None
) -> TLSMemoryBIOFactory:
    """
    C{site} through TLS with C{certificate}'s swappable context, offering h2
    and http/1.1 by ALPN; C{clock} times TLS's write aggregation (default:
    the reactor).
    """
    return TLSMemoryBIOFactory(certificate.context, False, _SiteBehindTls(site), clock=clock)


def tls_server(certificate: ListenerCertificate, site: IProtocolFactory, reactor: Any) -> IService:
    """
    The listener of one C{ssl:} endpoint: its TCP port (bound at
    C{privilegedStartService}, as strports does) serving C{site} through TLS
    with C{certificate}'s swappable context.
    """
    listen = certificate.listen
    service = TCPServer(
        listen.port, tls_factory(certificate, site), backlog=listen.backlog, interface=listen.interface,
        reactor=reactor,
    )
    return service  # type: ignore[no-any-return]
