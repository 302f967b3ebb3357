"""
An end stage: every call, when it ends, becomes one line of the access log
(L{aura_proxy.access_log}), made from the same row as its history row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.web.server import Request

from aura_proxy.access_log import LineFormat
from aura_proxy.stages import EndStage
from aura_proxy.stages.recording import Record

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["AccessLog"]


class AccessLog(EndStage):
    """
    Hands each ended call's line to the access log's writer, which only
    buffers it.

    @param record: the pipeline's L{Record} stage, whose row (made once per
        call, for history and for this line) the line is made from.
    @param line: L{aura_proxy.access_log.json_line} or C{text_line}.
    @param write: the writer's C{write}.
    """

    def __init__(self, record: Record, line: LineFormat, write: Callable[[str], None]) -> None:
        self._row = record.row_of
        self._line = line
        self._write = write

    def ended(self, request: Request, call: "Call") -> None:
        """Log C{call}."""
        self._write(self._line(self._row(request, call)))
