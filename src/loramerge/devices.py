"""Which device a command computes on: checked once, up front, so that ``--device cuda`` on a machine
without CUDA is one line before any model loads or worker starts, not an error deep inside torch."""

from __future__ import annotations

from loramerge.errors import BadInput


def check_device(device: str) -> str:
    """``device`` if torch can compute there (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch  # here, not at the top: the command line starts without torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise BadInput(f"`device='{device}'`: choose cpu, cuda or cuda:N", param="device")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = f"no CUDA device is available to torch {torch.__version__}"
            raise BadInput(f"`device='{device}'`: {why}", param="device")
        if index and int(index) >= torch.cuda.device_count():
            why = f"torch sees {torch.cuda.device_count()} CUDA device(s)"
            raise BadInput(f"`device='{device}'`: {why}", param="device")
    return device
