"""The `twistd aura-proxy` plugin: a name pointing at aura_proxy.tap, nothing else."""

from twisted.application.service import ServiceMaker

auraProxy = ServiceMaker(
    "aura-proxy",
    "aura_proxy.tap",
    "The aura-proxy gateway: routing, SSE streaming, header contract, call history.",
    "aura-proxy",
)
