"""The device a solve or a model runs on: "auto" means CUDA when present, else the CPU. One rule, one error.

Imports only `errors`. Asking `torch.cuda.is_available()` does not initialise CUDA.
"""

from __future__ import annotations

import torch

from .errors import BadOptionError


def resolve_device(device: str | None = "auto", option: str = "--device") -> torch.device:
    """`device` ("auto", "cpu", "cuda", "cuda:1", ...) as a torch device that exists here.

    Args:
        device: the requested device; None or "auto" picks CUDA when torch sees a GPU, else the CPU.
        option: how the caller names the setting, for the error message (`--device` on the command line).
    Raises:
        BadOptionError: not a torch device, or CUDA asked for where torch sees no GPU.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadOptionError(f"{option} {device!r} is not a torch device; use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BadOptionError(f"{option} {device} was asked for but CUDA is not available here; use {option} cpu "
                             "or auto.")
    return resolved
