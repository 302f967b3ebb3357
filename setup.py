"""
aura-proxy: the single-entry gateway for AI agent platforms.

The twistd plugin lives in twisted/plugins/ (no __init__.py there: it is a
portion of Twisted's plugin namespace).  It is installed as package data of
"twisted" so that `twistd aura-proxy` finds it after `pip install .`; for
`pip install -e .` the flat layout makes setuptools put the source tree itself on
sys.path, where Twisted's plugin search finds twisted/plugins/ as well
(tests/integration/test_install.py checks both).
"""

from setuptools import Extension, find_packages, setup

setup(
    name="aura-proxy",
    version="0.1.0",
    description="Single-entry gateway for AI agent platforms, with production-grade SSE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "."},
    packages=find_packages(include=["aura_proxy", "aura_proxy.*"]) + ["twisted.plugins"],
    package_data={
        "aura_proxy": ["defaults.ini", "py.typed", "_sse_stamp.pyi", "_chunked_read.pyi", "_relay_core.pyi", "history/*.sql",
                       "dashboard/static/*.html", "dashboard/static/*.js", "dashboard/static/*.css"],
        "twisted": ["plugins/aura_proxy_plugin.py"],
    },
    include_package_data=False,
    # The hot path's common cases in C: the SSE rewriter's (whole LF events)
    # and the upstream read's (whole chunks of a chunked body).  Optional:
    # without a C compiler the install still succeeds and the Python code,
    # which the C is tested against, does it all.
    ext_modules=[
        Extension("aura_proxy._sse_stamp", ["aura_proxy/_sse_stamp.c"], optional=True),
        Extension("aura_proxy._chunked_read", ["aura_proxy/_chunked_read.c"], optional=True),
        Extension("aura_proxy._relay_core", ["aura_proxy/_relay_core.c"], optional=True),
    ],
    install_requires=[
        # The stack the project chose: Twisted (reactor, twistd, twisted.web),
        # treq (client API; its testing tools drive the unit tests), Klein
        # (the front end), txpostgres (PostgreSQL without blocking the
        # reactor), pyOpenSSL and service_identity (https:// upstreams and
        # tls listeners, with certificate checks).
        # The range .ci/run tests: its floor (unit tests and an end-to-end
        # smoke) and its ceiling (everything).  Private names a fast path
        # uses are probed at import (aura_proxy/twisted_internals.py); raise
        # the ceiling only after the suite has run on the new release.
        # The http2 extra (the h2 and priority packages): TLS listeners offer
        # HTTP/2 by ALPN, served by Twisted's own H2Connection.
        "Twisted[http2]>=24.3.0,<26.11",
        "treq>=23.11",
        "klein>=23.12",
        "txpostgres>=1.7",
        # txpostgres drives psycopg2's asynchronous connections.
        "psycopg2-binary>=2.9",
        # JWT verification ([auth]): a maintained JWT library, so that no
        # signature or claim check is hand-written here; the crypto extra
        # (cryptography, already pulled in by pyOpenSSL) gives RS256 and ES256.
        "PyJWT[crypto]>=2.8",
        "pyOpenSSL>=24",
        "service_identity>=24",
        # Redis Streams for the shared resume log: a Twisted-native client,
        # where a blocking one would stall the reactor.
        "txredisapi>=1.4.10",
        # GET /metrics on the admin port ([metrics]): the Prometheus text
        # format and its parser (the parent of workers > 1 sums its
        # workers' figures), from the maintained client, not hand-written;
        # the dashboard reads the same registry back.
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            # Property tests of the SSE parser (arbitrary streams, arbitrary splits).
            "hypothesis>=6.100",
            # The upstream the integration tests run, as Aura runs: FastAPI
            # with sse-starlette under uvicorn.
            "fastapi>=0.110",
            "sse-starlette>=2.0",
            "uvicorn>=0.29",
            # An independent SSE client (POST streams, resume) for end-to-end tests.
            "httpx>=0.27",
            "httpx-sse>=0.4",
            # Type checks; mypy-zope teaches mypy zope.interface.
            "mypy>=1.10",
            "mypy-zope>=1.0",
        ],
    },
    entry_points={"console_scripts": ["aura-proxy-check=aura_proxy.__main__:check_command"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
