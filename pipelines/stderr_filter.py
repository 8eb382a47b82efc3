"""Keep a successful run's stderr free of one known, harmless Ray core ERROR line.

Every Ray Data actor pool makes Ray's C++ core worker log, at ERROR level, that the actor "has constructor
arguments in the object store and max_restarts > 0" (ray-project/ray#57733: Ray Data passes its own
arguments through the object store; nothing the caller can change). The line is written by C++ straight to
file descriptor 2, so Python logging cannot filter it: :func:`filter_stderr` routes fd 2 through a small child
process that forwards every other line unchanged. The child outlives a crash of the parent, so nothing written
before a crash (a fatal library error, a segfault trace) is lost.

    python -m labelnext.pipelines.stderr_filter   # the child: stdin -> stdout, known lines dropped
"""

from __future__ import annotations

import os
import subprocess
import sys

KNOWN_HARMLESS = (
    b"has constructor arguments in the object store and max_restarts > 0",
)


def forward(source, sink) -> int:
    """Copy lines from ``source`` to ``sink`` except the known ones; returns how many were dropped."""
    dropped = 0
    for line in iter(source.readline, b""):
        if any(marker in line for marker in KNOWN_HARMLESS):
            dropped += 1
            continue
        sink.write(line)
        sink.flush()
    return dropped


def filter_stderr() -> bool:
    """Route this process's fd 2 through the filter child; returns whether it did. Off when stderr is not a
    real file descriptor or ``LABELNEXT_RAW_STDERR=1``."""
    if os.environ.get("LABELNEXT_RAW_STDERR") == "1":
        return False
    try:
        original = os.dup(2)
    except OSError:
        return False
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-m", __name__], stdin=read_end, stdout=original, stderr=original,
                         close_fds=True, start_new_session=True)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        os.close(original)
        return False
    os.close(read_end)
    os.close(original)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    return True


if __name__ == "__main__":
    forward(sys.stdin.buffer, sys.stdout.buffer)
