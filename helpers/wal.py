"""Read a SQLite WAL file the way SQLite does, to see damage SQLite would pass over in silence.

SQLite replays WAL frames while their salts match the header's and their cumulative checksums
hold, up to the last commit frame, and ignores the rest without a word. A bit flip or a hole
in the middle of the file therefore drops every transaction after it. ``scan`` finds where the
valid chain ends and counts, after it, the commit frames that still carry this WAL's salts:
each is a transaction that committed in this generation and that SQLite will not replay.
(Frames of a transaction cut off by a crash can also lie there, but never a commit frame:
had it committed, the chain would reach it.)

What it cannot see: a WAL cut short at a frame boundary looks exactly like one whose last
transactions were never written, so a truncated WAL is not detectable from the file alone.
Format: https://www.sqlite.org/fileformat2.html#walformat
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = (0x377F0682, 0x377F0683)  # little- or big-endian checksums
HEADER, FRAME_HEADER = 32, 24


@dataclass
class WalReport:
    frames: int          # whole frames in the file
    valid: int           # frames in the unbroken chain SQLite would replay (up to the last commit)
    lost_commits: int    # commit frames of this generation after the break: lost transactions
    page_size: int = 0

    @property
    def damaged(self) -> bool:
        return self.lost_commits > 0

    def describe(self) -> str:
        return (f"the WAL breaks after frame {self.valid} of {self.frames}: {self.lost_commits} committed "
                f"transactions after it cannot be replayed and are lost")


def _checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _is_our_commit(data: bytes, at: int, salt1: int, salt2: int) -> bool:
    _page, commit, f_salt1, f_salt2 = struct.unpack(">4I", data[at:at + 16])
    return bool(commit) and (f_salt1, f_salt2) == (salt1, salt2)


def scan(path: str | os.PathLike) -> WalReport | None:
    """The WAL at ``path`` checked frame by frame; None when there is no WAL or it is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < HEADER:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:HEADER])
    if magic not in MAGIC or page_size < 512 or page_size & (page_size - 1):
        return WalReport(0, 0, 0)  # not a WAL header SQLite would use: it ignores the file
    big = magic & 1 == 1
    size = FRAME_HEADER + page_size
    frames = (len(data) - HEADER) // size
    s0, s1 = _checksum(data[:24], 0, 0, big)
    if (s0, s1) != (c1, c2):  # a damaged header: SQLite ignores every frame
        commits = sum(1 for n in range(frames) if _is_our_commit(data, HEADER + n * size, salt1, salt2))
        return WalReport(frames, 0, commits, page_size)
    valid = last_commit = 0
    broken = False
    lost = 0
    for n in range(frames):
        at = HEADER + n * size
        header = data[at:at + FRAME_HEADER]
        _page, commit, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">6I", header)
        ours = (f_salt1, f_salt2) == (salt1, salt2)
        if not broken and ours:
            s0, s1 = _checksum(header[:8], s0, s1, big)
            s0, s1 = _checksum(data[at + FRAME_HEADER:at + size], s0, s1, big)
            broken = (s0, s1) != (f_c1, f_c2)
        else:
            broken = True
        if broken:
            lost += bool(ours and commit)
            continue
        valid += 1
        if commit:
            last_commit = valid
    # Frames after the last commit of an unbroken chain are a transaction that never committed.
    return WalReport(frames, last_commit, lost, page_size)
