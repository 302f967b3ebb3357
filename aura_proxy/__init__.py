"""
aura-proxy: the single-entry gateway in front of the Aura agent platform.

The request path, in order, is in L{aura_proxy.proxy}; configuration in
L{aura_proxy.config}; the service tree in L{aura_proxy.assembly}, run by
twistd through L{aura_proxy.tap}.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
