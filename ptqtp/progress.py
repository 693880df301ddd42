"""Progress bars on stderr for long runs (quantize, calibrate), or a silent stand-in when asked for quiet.

Imports nothing from ptqtp; tqdm only when a bar is shown.
"""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, s, refresh=True): pass
    def close(self): pass


def progress_bar(total: int, show: bool, desc: str, unit: str):
    """A tqdm bar over `total` items (or a stand-in with the same methods when `show` is False)."""
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)
