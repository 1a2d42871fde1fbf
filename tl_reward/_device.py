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


def checked_n_devices(device: str | None, n_devices: int) -> int:
    """``n_devices`` if the model can be split over that many devices: one, or several CUDA
    devices from ``device``'s index on (TransformerLens's layer split, ``cfg.n_devices``)."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise DeviceError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices == 1:
        return 1
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        raise DeviceError(
            f"n_devices={n_devices} splits the layers over CUDA devices; pass device='cuda' "
            f"(got device={device!r}), or n_devices=1"
        )
    start = dev.index or 0
    n = torch.cuda.device_count()
    if start + n_devices > n:
        raise DeviceError(
            f"n_devices={n_devices} from {str(dev)!r} needs cuda:{start}..cuda:"
            f"{start + n_devices - 1}, but this machine has {n} CUDA devices"
        )
    return n_devices


def block_device(cfg, layer: int) -> torch.device:
    """The device of block ``layer``: TransformerLens's own split of the layers over
    ``cfg.n_devices`` devices (``get_device_for_block_index``), which its forward follows when it
    moves the residual stream from block to block. The embeddings live with block 0; the final
    norm and the reward head with the last block (:func:`output_device`)."""
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    return get_device_for_block_index(layer, cfg)


def output_device(cfg) -> torch.device:
    """Where the final norm, the reward head and the rewards live: the last block's device."""
    return block_device(cfg, cfg.n_layers - 1)
