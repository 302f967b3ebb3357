"""
The twistd service: C{twistd -n aura-proxy [--config FILE] [--demo]}.

L{Options} is the command line and L{makeService} all the plugin calls; the
service tree itself is built by L{aura_proxy.assembly}, as for the C{.tac}
file, the worker processes and the tests.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from aura_proxy.config import ConfigError

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """
    Command line of C{twistd aura-proxy}.

    The configuration file is read and checked by L{makeService}, not here:
    twistd answers an option error with its whole usage text, which would
    bury the lines that say what is wrong in the file.
    """

    synopsis = "[--config FILE] [--demo]"
    optParameters = [
        ["config", "c", None, "INI configuration file (default: the embedded defaults, "
         "identical to etc/aura-proxy.ini)"],
    ]
    optFlags = [
        ["demo", None, "also start the demo agent upstream on 127.0.0.1:9000"],
    ]


def makeService(options: Options) -> IService:
    """
    Build the service twistd runs (the plugin's entry point).

    An invalid configuration ends twistd here with its problems on stderr,
    one line each, and exit status 1.
    """
    # Imported here, not above: twistd reads this module's Options before it
    # installs the reactor, and Klein (the admin site) imports the default
    # reactor when it is imported.
    from twisted.internet import reactor

    from aura_proxy.assembly import exit_with, service_from_file

    try:
        return service_from_file(options["config"], reactor, demo=bool(options["demo"]))
    except ConfigError as e:
        exit_with(e)
