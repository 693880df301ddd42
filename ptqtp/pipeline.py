"""Calibration-free quantization of a checkpoint on disk: loader -> solver -> packing -> writer, streaming.

Imports `loader` (the source), `converter` (solve and pack one tensor), `writer` (the output directory),
`config` and `device`; never the calibrated driver, never transformers. Nothing here builds a model: every
weight is read from its shard, solved on its own (by row chunks, so memory stays bounded) and streamed into
its output shard; `writer` says how OUT is planned, resumed and reported. `quantize.quantize_checkpoint`
picks this driver when no calibration text is given.
"""

from __future__ import annotations

import time

from . import loader, writer
from .config import TritPlaneConfig
from .converter import TensorConverter
from .device import resolve_device


def quantize_calibration_free(src, dst, config: TritPlaneConfig | None = None, *, resume: bool = False,
                              overwrite: bool = False, max_shard_size="5GB", show_progress: bool = True,
                              revision: str | None = None) -> dict:
    """Quantize every decoder Linear of the checkpoint `src` and write the ptqtp directory `dst`.

    Args and returns: as `ptqtp.quantize_checkpoint` without calibration.
    """
    t_start = time.perf_counter()
    config = config or TritPlaneConfig()
    max_bytes = writer.parse_size(max_shard_size)
    device = resolve_device(config.device)
    source = loader.open_source(src, revision, config)
    return writer.write_checkpoint(source, dst, config, TensorConverter(config, device), model_ref=src,
                                   device=device, resume=resume, overwrite=overwrite, max_shard_size=max_bytes,
                                   show_progress=show_progress, t_start=t_start)
