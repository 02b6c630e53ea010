"""Per-tensor randomness: a result never depends on execution order, threads or how work is split."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def tensor_seed(seed: int, tensor_name: str, input_index: int) -> int:
    """A 63-bit seed derived from ``(seed, tensor name, input index)`` alone."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{input_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def tensor_generators(
    seed: int, tensor_name: str, input_indices: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per input of a tensor's merge, keyed by the input's position in the user's list."""
    return [
        torch.Generator(device=device).manual_seed(tensor_seed(seed, tensor_name, index)) for index in input_indices
    ]


@contextmanager
def default_generator_seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Within: ``device``'s default generator starts from ``seed``. After: every generator as it was before.

    For library calls that draw from the default generator and take no ``generator=`` (``torch.svd_lowrank``).
    Only that one generator is seeded: ``torch.manual_seed`` would also reseed every CUDA device, which
    ``fork_rng`` restores only for the devices it is given, and so change a caller's CUDA stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.default_generators[index].manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


@contextmanager
def thread_independent(tensor: torch.Tensor) -> Iterator[None]:
    """Run a CPU decomposition on one thread: LAPACK splits its blocked SVD by thread count, so the bits of
    the result would otherwise depend on the machine's cores (tests/test_determinism.py)."""
    previous = torch.get_num_threads()
    if tensor.device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reproducible_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD, on one CPU thread (``thread_independent``)."""
    with thread_independent(matrix):
        return torch.linalg.svd(matrix, full_matrices=False)


def reproducible_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced QR, on one CPU thread (``thread_independent``)."""
    with thread_independent(matrix):
        return torch.linalg.qr(matrix)
