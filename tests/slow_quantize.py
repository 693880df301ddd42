"""`ptqtp quantize`, slowed down by DELAY seconds per tensor written, so that a test can stop it midway.

Usage: python tests/slow_quantize.py DELAY quantize MODEL -o OUT [options]

The delay is patched into this process only (around `ShardWriter.write` and `ShardWriter.copy_from_file`);
ptqtp itself has no test hook. With SLOW_QUANTIZE_HOLD=N in the environment, the run also waits (up to 120 s)
right after its manifest first lists N finished shards, so that a test's signal lands mid-run whatever the
machine's speed. Ctrl-C raises KeyboardInterrupt here as in a terminal, even when the parent started this
process with SIGINT ignored (as some test runners' workers do).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from ptqtp import checkpoint as ckpt
from ptqtp.cli import main

HOLD_S = 120.0


def _slowed(method, delay: float):
    def slow(self, *args, **kwargs):
        time.sleep(delay)
        return method(self, *args, **kwargs)

    return slow


def _holding(write_json, shards: int):
    held = []

    def write(path, obj, **kwargs):
        write_json(path, obj, **kwargs)
        if not held and str(path).endswith("ptqtp_manifest.json") and len(obj.get("shards", ())) >= shards:
            held.append(True)
            time.sleep(HOLD_S)  # the manifest is on disk: wait for the test's signal

    return write


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    delay = float(sys.argv[1])
    ckpt.ShardWriter.write = _slowed(ckpt.ShardWriter.write, delay)
    ckpt.ShardWriter.copy_from_file = _slowed(ckpt.ShardWriter.copy_from_file, delay)
    if os.environ.get("SLOW_QUANTIZE_HOLD"):
        ckpt.atomic_write_json = _holding(ckpt.atomic_write_json, int(os.environ["SLOW_QUANTIZE_HOLD"]))
    sys.exit(main(sys.argv[2:]))
