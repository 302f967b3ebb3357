"""
aura-proxy for `twistd -y aura-proxy.tac` (the same service as `twistd aura-proxy`,
built by aura_proxy.assembly: with `[gateway] workers = N` the supervisor of N
worker processes).

The configuration file is $AURA_PROXY_CONFIG, default etc/aura-proxy.ini
relative to the working directory; an invalid one stops the start with the
same messages as `python -m aura_proxy check`. AURA_PROXY_DEMO=1 also starts
the demo agent.
"""

import os

from twisted.application.service import Application
from twisted.internet import reactor

from aura_proxy.assembly import exit_with, service_from_file
from aura_proxy.config import ConfigError

try:
    service = service_from_file(
        os.environ.get("AURA_PROXY_CONFIG", "etc/aura-proxy.ini"),
        reactor,
        demo=os.environ.get("AURA_PROXY_DEMO") == "1",
    )
except ConfigError as e:
    exit_with(e)

application = Application("aura-proxy")
service.setServiceParent(application)
