"""`ptqtp quantize`, slowed down by DELAY seconds per tensor written, so that a test can kill it midway.

Usage: python tests/slow_quantize.py DELAY quantize MODEL -o OUT [options]

The delay is patched into this process only (around `ShardWriter.write` and `ShardWriter.copy_from_file`);
ptqtp itself has no test hook.
"""

from __future__ import annotations

import sys
import time

from ptqtp import checkpoint as ckpt
from ptqtp.cli import main


def _slowed(method, delay: float):
    def slow(self, *args, **kwargs):
        time.sleep(delay)
        return method(self, *args, **kwargs)

    return slow


if __name__ == "__main__":
    delay = float(sys.argv[1])
    ckpt.ShardWriter.write = _slowed(ckpt.ShardWriter.write, delay)
    ckpt.ShardWriter.copy_from_file = _slowed(ckpt.ShardWriter.copy_from_file, delay)
    sys.exit(main(sys.argv[2:]))
