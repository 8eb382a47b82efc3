"""The stderr filter drops only Ray's known-harmless actor-pool ERROR line and loses nothing on a crash."""

from __future__ import annotations

import io
import subprocess
import sys

from labelnext.pipelines.stderr_filter import forward

KNOWN = (b"[2026-11-25 06:15:39,070 E 7405 7405] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
         b"Embedder))' and ID: '7b3e' has constructor arguments in the object store and max_restarts > 0. If ...\n")


def test_forward_drops_the_known_line_and_keeps_every_other():
    lines = [b"12:00:01 INFO embed: 10 docs\n", KNOWN, b"[2026-11-25 06:15:40,000 E 1 1] raylet.cc:1: real error\n",
             b"no newline at the end"]
    sink = io.BytesIO()
    assert forward(io.BytesIO(b"".join(lines)), sink) == 1
    assert sink.getvalue() == lines[0] + lines[2] + lines[3]


def test_a_process_that_crashes_after_filtering_still_shows_its_last_words():
    script = (
        "import os, sys\n"
        "from labelnext.pipelines.stderr_filter import filter_stderr\n"
        "assert filter_stderr()\n"
        f"os.write(2, {KNOWN!r})\n"
        "os.write(2, b'FATAL ERROR: cannot load libfoo.so\\n')\n"
        "os.abort()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"FATAL ERROR: cannot load libfoo.so" in proc.stderr and b"constructor arguments" not in proc.stderr
