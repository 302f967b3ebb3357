"""
Append-only, segmented on-disk spool for rows the database could not take.

Rows are JSON lines in segment files C{history-<seq>.jsonl} under the spool
directory; C{seq} only grows, so file name order is row order.  The rules that
keep it safe:

  - Appends go to the I{active} segment only, one C{write} + C{fsync} per batch.
  - A segment is read only once it is I{sealed}: before the oldest segment is
    read, it stops being the active one, so new rows go to a new file and a
    segment being replayed never grows.
  - A segment is deleted only after its last row was committed (L{Spool.ack}).
    A crash before that replays the segment again: the insert is idempotent.
  - A new process never appends to an old file (its tail may be torn by a
    kill -9): every segment found at L{Spool.open} is sealed.

This class does blocking file I/O and is not thread-safe: the service calls it
from a single dedicated thread, never from the reactor thread.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import IO, List, Optional, Sequence

from twisted.logger import Logger

from aura_proxy.history.schema import Row, row_from_json, row_to_json

__all__ = ["Spool", "Chunk", "gather_orphans"]

_SEGMENT = re.compile(r"^history-(\d{16})\.jsonl$")
_WORKER_DIR = re.compile(r"^worker-(\d+)$")


@dataclass(frozen=True)
class Chunk:
    """Rows read from one sealed segment, from byte C{start} to byte C{end}."""

    segment: str
    start: int
    end: int
    rows: List[Row]
    #: True when C{end} is the end of the segment: acking deletes the file.
    last: bool
    #: Lines that were not valid rows (torn tail of a killed process, garbage).
    bad: int


class Spool:
    """A directory of JSON-lines segments; see the module docstring."""

    log = Logger()

    def __init__(self, directory: str, max_segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        #: A segment this big is sealed, so that replay can free disk space
        #: segment by segment during a long outage.
        self.max_segment_bytes = max_segment_bytes
        self._next_seq = 0
        self._active: Optional[IO[str]] = None
        self._active_name: Optional[str] = None
        # Where replay of the oldest segment has got to (segment name, byte).
        self._cursor: Optional[tuple[str, int]] = None
        self._found: Optional[int] = None

    def open(self) -> int:
        """
        Create the directory if needed and adopt segments left by a previous
        run (all sealed).  Return how many rows are waiting in them.
        Idempotent: later calls adopt nothing new and return 0.
        """
        if self._found is not None:
            return 0
        os.makedirs(self.directory, exist_ok=True)
        pending = 0
        segments = self._segments()
        for name in segments:
            with open(self._path(name), "rb") as f:
                pending += sum(1 for line in f if line.strip())
        if segments:
            self._next_seq = int(_SEGMENT.match(segments[-1]).group(1)) + 1  # type: ignore[union-attr]
        self._found = pending
        return pending

    def append(self, rows: Sequence[Row]) -> None:
        """Append C{rows} durably (one fsync for the whole batch)."""
        if not rows:
            return
        # Never reuse an old segment's name: learn the highest one first.
        self.open()
        if self._active is None:
            self._active_name = f"history-{self._next_seq:016d}.jsonl"
            self._next_seq += 1
            self._active = open(self._path(self._active_name), "a", encoding="utf-8")
            self._fsync_dir()
        data = "".join(json.dumps(row_to_json(row), separators=(",", ":")) + "\n" for row in rows)
        self._active.write(data)
        self._active.flush()
        os.fsync(self._active.fileno())
        if self._active.tell() >= self.max_segment_bytes:
            self._seal()

    def read(self, max_rows: int) -> Optional[Chunk]:
        """
        Return up to C{max_rows} rows from the oldest segment, continuing where
        the last acked chunk stopped, or None when the spool is empty.
        """
        self.open()
        segments = self._segments()
        if not segments:
            return None
        name = segments[0]
        if name == self._active_name:
            self._seal()
        start = self._cursor[1] if self._cursor and self._cursor[0] == name else 0
        rows: List[Row] = []
        bad = 0
        with open(self._path(name), "rb") as f:
            f.seek(start)
            while len(rows) < max_rows:
                line = f.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    # Torn write of a killed process: those rows were never acked.
                    bad += 1
                    self.log.warn("history spool {segment}: torn last line skipped", segment=name)
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                        raise ValueError("not a row")
                except ValueError:
                    if line.strip():
                        bad += 1
                        self.log.error(
                            "history spool {segment}: unreadable line at byte {offset} dropped",
                            segment=name, offset=f.tell() - len(line),
                        )
                    continue
                rows.append(row_from_json(obj))
            end = f.tell()
            last = f.read(1) == b""
        return Chunk(name, start, end, rows, last, bad)

    def ack(self, chunk: Chunk) -> None:
        """C{chunk}'s rows are committed: move past them; delete a finished segment."""
        if chunk.last:
            try:
                os.remove(self._path(chunk.segment))
            except FileNotFoundError:
                pass
            self._fsync_dir()
            self._cursor = None
        else:
            self._cursor = (chunk.segment, chunk.end)

    def close(self) -> None:
        """Close the active segment (its rows stay for the next run)."""
        self._seal()

    def _seal(self) -> None:
        if self._active is not None:
            self._active.close()
        self._active = None
        self._active_name = None

    def _segments(self) -> List[str]:
        return sorted(n for n in os.listdir(self.directory) if _SEGMENT.match(n))

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _fsync_dir(self) -> None:
        # Make file creation/deletion itself durable, not only file contents.
        _fsync_directory(self.directory)


def gather_orphans(spool_dir: str, workers: int) -> int:
    """
    Move segments that no process of this run would replay into a spool that
    will: a single process (C{workers} 1) takes those its former workers left
    in C{spool_dir/worker-K}; with C{workers = N}, worker 1's spool takes
    those a single process left in C{spool_dir} and those of workers beyond
    N.  Run by the parent (or the single process) at start, before any
    worker opens its spool.  Each segment keeps its rows and their order;
    it gets the next free name in its new directory.  Returns how many
    segments moved.
    """
    if not os.path.isdir(spool_dir):
        return 0
    if workers > 1:
        into = os.path.join(spool_dir, "worker-1")
        sources = [spool_dir] + [
            os.path.join(spool_dir, name) for name, index in _worker_dirs(spool_dir) if index > workers
        ]
    else:
        into = spool_dir
        sources = [os.path.join(spool_dir, name) for name, _ in _worker_dirs(spool_dir)]
    found = [(source, sorted(n for n in os.listdir(source) if _SEGMENT.match(n))) for source in sources]
    if not any(names for _, names in found):
        return 0
    os.makedirs(into, exist_ok=True)
    taken = sorted(n for n in os.listdir(into) if _SEGMENT.match(n))
    seq = int(_SEGMENT.match(taken[-1]).group(1)) + 1 if taken else 0  # type: ignore[union-attr]
    moved = 0
    for source, names in found:
        for name in names:
            os.rename(os.path.join(source, name), os.path.join(into, f"history-{seq:016d}.jsonl"))
            seq += 1
            moved += 1
        if names:
            _fsync_directory(source)
        if source != spool_dir and not os.listdir(source):
            os.rmdir(source)
    _fsync_directory(into)
    Spool.log.info(
        "history: {n} spool segments left by another process layout moved to {dir} for replay",
        n=moved, dir=into,
    )
    return moved


def _worker_dirs(spool_dir: str) -> List[tuple[str, int]]:
    """The C{worker-K} directories in C{spool_dir}, by K."""
    found = []
    for name in os.listdir(spool_dir):
        match = _WORKER_DIR.match(name)
        if match and os.path.isdir(os.path.join(spool_dir, name)):
            found.append((name, int(match.group(1))))
    return sorted(found, key=lambda item: item[1])


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
