"""The adapter merge's thread policy (``loramerge.threads``): small modules run on one thread, large dense ones
on the caller's threads, and the caller's count is restored whatever happens."""

from __future__ import annotations

import pytest
import torch

from loramerge import LoraAdapter, LoraModule, merge_adapters, threads
from loramerge.adapters import merge


def _adapters(shape: tuple[int, int], ranks: tuple[int, ...]) -> list[LoraAdapter]:
    generator = torch.Generator().manual_seed(0)
    return [
        LoraAdapter(modules={"proj": LoraModule(A=torch.randn(r, shape[1], generator=generator),
                                                B=torch.randn(shape[0], r, generator=generator), scale=1.0)},
                    config={"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["proj"]})
        for r in ranks
    ]  # fmt: skip


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _threads_seen(monkeypatch, adapters: list[LoraAdapter], **params: object) -> list[int]:
    seen: list[int] = []
    original = merge.merge_module

    def spy(plan, module, pieces=None):
        seen.append(torch.get_num_threads())
        return original(plan, module, pieces)

    monkeypatch.setattr(merge, "merge_module", spy)
    merge_adapters(adapters, None, **params)
    return seen


@pytest.mark.parametrize("method", ["iso_c", "ties", "svd", "linear"])
def test_low_rank_modules_run_on_one_thread_and_the_callers_count_is_restored(monkeypatch, two_threads, method):
    assert _threads_seen(monkeypatch, _adapters((64, 32), (4, 8)), method=method) == [1]
    assert torch.get_num_threads() == 2


def test_a_large_dense_module_keeps_the_callers_threads(monkeypatch, two_threads):
    monkeypatch.setattr(threads, "SMALL_WORK", 64 * 32)  # this 64 x 32 full-space module is "large"
    assert _threads_seen(monkeypatch, _adapters((64, 32), (4, 8)), method="ties", space="full") == [2]
    monkeypatch.setattr(threads, "SMALL_WORK", 64 * 32 + 1)
    assert _threads_seen(monkeypatch, _adapters((64, 32), (4, 8)), method="ties", space="full") == [1]


def test_the_work_of_a_module():
    assert threads.module_work("core", (14336, 4096), (16, 16, 16)) == 14336 * 48
    assert threads.module_work("full", (4096, 4096), (16, 16, 16)) == 4096 * 4096
    assert threads.threads_for(threads.SMALL_WORK - 1) == 1
    assert threads.threads_for(threads.SMALL_WORK) is None


def test_the_callers_count_is_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError), threads.cpu_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("a kernel failed")
    assert torch.get_num_threads() == 2


def test_other_devices_leave_the_cpu_threads_alone(two_threads):
    with threads.cpu_threads(1, device="meta"):
        assert torch.get_num_threads() == 2
