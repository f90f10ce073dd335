"""Where the Triton kernels may run. Importing this never imports triton; that is deferred to a call."""
from __future__ import annotations

import importlib
import os

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when Triton kernels can run on ``device``: CUDA with triton importable, or CPU under Triton's interpreter.

    The interpreter (env ``TRITON_INTERPRET=1``) runs kernels on CPU tensors with numpy; it is how CPU-only CI checks
    the kernels. Triton reads that variable when a kernel is *defined*, i.e. when
    ``gbsd_core.fast.kernels.triton_kernels`` is first imported, so it must be set before the first Triton call in the
    process. Both env variables are read here on every call, never cached.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False
    else:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_enabled_by_env() -> bool:
    """``GBSD_TRITON=0`` switches the Triton paths off; read at call time so tests and users can flip it live."""
    return os.environ.get("GBSD_TRITON", "1") != "0"
