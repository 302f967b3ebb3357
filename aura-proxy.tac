"""
aura-proxy for `twistd -y aura-proxy.tac` (the same service as `twistd aura-proxy`).

The configuration file is $AURA_PROXY_CONFIG, default etc/aura-proxy.ini
relative to the working directory; an invalid one stops the start with the
same messages as `python -m aura_proxy check`.
"""

import os
import sys

from twisted.application.service import Application
from twisted.internet import reactor

from aura_proxy.config import ConfigError, load_config
from aura_proxy.tap import build_service, prepare_process

try:
    config = load_config(os.environ.get("AURA_PROXY_CONFIG", "etc/aura-proxy.ini"))
except ConfigError as e:
    sys.stderr.write(f"invalid configuration:\n{e}\n")
    raise SystemExit(1)

application = Application("aura-proxy")
build_service(config, reactor, demo=os.environ.get("AURA_PROXY_DEMO") == "1").setServiceParent(
    application
)
prepare_process(reactor)
