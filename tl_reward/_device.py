"""Devices: a clear error for one that is not a torch device or that this machine lacks."""

import torch

from .errors import DeviceError


def checked_device(device: str | torch.device) -> str:
    """``device`` as a string, if it is a torch device this torch build and machine have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(
            f"device={device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(
                f"device={device!r}, but this machine or torch build ({torch.__version__}) has no "
                "CUDA device; use device='cpu', or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device={device!r}, but there are {n} CUDA devices: cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r}, but MPS is not available here; use device='cpu'")
    return str(dev)
