"""
Resumable streams: stream logs kept by the gateway so that a client that
reconnects with C{Last-Event-ID} gets exactly what it missed.

See L{aura_proxy.resume.log} for the contract, docs/resume.md for clients.
"""

from aura_proxy.resume.log import Attachment, MemoryResumeLog, ResumeLog, Subscriber

__all__ = ["Attachment", "MemoryResumeLog", "ResumeLog", "Subscriber"]
