"""
The floor of the gateway's web stack: a server that answers every GET with
the same 28-byte JSON body, no proxying, tuned as the gateway tunes itself
(aura_proxy.process.prepare_process: the lean epoll loop, the GC's pace).

    python bench/stack_floor_server.py twisted|klein PORT

`twisted` serves it from a plain twisted.web leaf resource; `klein` from a
Klein route that matches every path, as aura_proxy.proxy.Gateway does.
Used by bench/stack-floor.
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from klein import Klein  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.web import resource, server  # noqa: E402
from twisted.web.server import Request  # noqa: E402

from aura_proxy.process import prepare_process  # noqa: E402

BODY = b'{"ok":true,"n":1,"msg":"hi"}'


class Constant(resource.Resource):
    """Every path: the JSON body."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return BODY


app = Klein()


@app.route("/", branch=True, strict_slashes=False)
def constant(request: Request) -> bytes:
    """Every path: the JSON body."""
    request.setHeader(b"content-type", b"application/json")
    return BODY


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    root = Constant() if kind == "twisted" else app.resource()
    site = server.Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log, as the bench gateway
    prepare_process(reactor)
    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
