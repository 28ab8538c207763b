"""Check the estimators' ``device`` parameter against what this machine has."""

from __future__ import annotations

import torch


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_device(device) -> torch.device | None:
    """The torch device named by ``device``, or a ``ValueError`` saying why it cannot be used.

    Run before any work, so that a machine without the device fails with a
    message naming the parameter instead of torch's bare assertion from deep
    inside the first ``.to(device)``.

    Parameters
    ----------
    device : str, torch.device or None
        What the estimator was given; None (skorch: leave the module where it
        is) passes through.

    Returns
    -------
    torch.device or None

    Raises
    ------
    ValueError
        If ``device`` is no torch device, or names a CUDA device (or index) or
        MPS that this machine does not have.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device; "
            f"pass 'cpu', 'cuda', 'cuda:0' or 'mps' ({exc})"
        ) from None
    if dev.type == "cuda":
        count = _cuda_count()
        if count == 0:
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            )
            raise ValueError(
                f"device={device!r}, but this machine has no CUDA device visible to PyTorch "
                f"{torch.__version__} ({build}); pass device='cpu'."
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={device!r}, but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}."
            )
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(
            f"device={device!r}, but MPS is not available on this machine; pass device='cpu'."
        )
    return dev


def cuda_devices(device) -> int | None:
    """How many workers ``device`` allows on this machine: the visible GPUs for CUDA, else None."""
    dev = check_device(device)
    return _cuda_count() if dev is not None and dev.type == "cuda" else None
