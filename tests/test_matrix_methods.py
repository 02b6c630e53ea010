"""The methods that need whole matrices (Iso-C, Iso-CTS, TSV-M, KnOTS, WUDI, DC-Merge) against direct dense
implementations of their papers' definitions, their identities, and core space = full space where the method is
basis-equivariant."""

from __future__ import annotations

import pytest
import torch

from conftest import peft_delta, peft_with_adapters
from loramerge import load_adapter, merge_adapters, save_adapter
from loramerge.adapters.model import LoraAdapter, LoraModule

NAME = "layer.proj"
WEIGHTS = [1.0, -0.5, 0.8]


def adapter(seed: int, rank: int, out: int = 40, inp: int = 30, B=None, A=None) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(out, rank, generator=generator) if B is None else B
    A = torch.randn(rank, inp, generator=generator) if A is None else A
    module = LoraModule(A=A, B=B, scale=1.5)
    return LoraAdapter(modules={NAME: module}, config={"peft_type": "LORA", "r": rank, "lora_alpha": 1.5 * rank})


def mixed() -> list[LoraAdapter]:
    return [adapter(0, 4), adapter(1, 6), adapter(2, 3)]


def merged_delta(adapters, method: str, space: str, **params) -> torch.Tensor:
    merged = merge_adapters(adapters, WEIGHTS, method, space=space, params=params)
    return merged.modules[NAME].delta()


def deltas(adapters) -> list[torch.Tensor]:
    return [a.modules[NAME].delta() for a in adapters]


def close(x: torch.Tensor, y: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert (x - y).norm() <= tolerance * max(1.0, y.norm()), float((x - y).norm() / y.norm())


def orthogonalize(M: torch.Tensor) -> torch.Tensor:
    """The polar factor written as ``M (MᵀM)^(-1/2)``, independent of the code's SVD route."""
    evals, evecs = torch.linalg.eigh(M.T @ M)
    return M @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def iso_c_reference(tasks, weights, alpha):
    """Iso-C as the paper writes it: Δ = Σ w_i Δ_i = U Σ Vᵀ, then α · mean(σ) · U Vᵀ (rank of Δ kept)."""
    total = sum(w * t for w, t in zip(weights, tasks, strict=True))
    U, S, Vh = torch.linalg.svd(total.double(), full_matrices=False)
    r = int(torch.linalg.matrix_rank(total))  # float32 round-off is not rank
    return (alpha * S[:r].mean() * U[:, :r] @ Vh[:r]).float()


def tsv_reference(tasks, weights, alpha, keep):
    """TSV-M: per task the top ⌈keep · rank⌉ triplets; stacked U and V each replaced by U (UᵀU)^(-1/2)."""
    lefts, values, rights = [], [], []
    for w, t in zip(weights, tasks, strict=True):
        U, S, Vh = torch.linalg.svd(t.double(), full_matrices=False)
        k = int(torch.ceil(torch.tensor(keep * int(torch.linalg.matrix_rank(t)))))
        lefts.append(U[:, :k]), values.append(w * S[:k]), rights.append(Vh[:k].T)

    U, V = orthogonalize(torch.cat(lefts, 1)), orthogonalize(torch.cat(rights, 1))
    return (alpha * U @ torch.diag(torch.cat(values)) @ V.T).float()


@pytest.mark.parametrize("space", ["core", "full"])
def test_iso_c_is_the_flat_spectrum_of_the_sum(space):
    adapters = mixed()
    result = merged_delta(adapters, "iso_c", space, alpha=1.3)
    close(result, iso_c_reference(deltas(adapters), WEIGHTS, 1.3))
    total = sum(w * t for w, t in zip(WEIGHTS, deltas(adapters), strict=True))
    r = int(torch.linalg.matrix_rank(total))
    values = torch.linalg.svdvals(result)[:r]
    assert (values.max() - values.min()) / values.max() < 1e-4  # flat
    U_sum = torch.linalg.svd(total)[0][:, :r]
    U_res = torch.linalg.svd(result)[0][:, :r]
    close(U_sum @ U_sum.T, U_res @ U_res.T, 1e-4)  # the same left singular subspace


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_tsv_m_against_the_paper(space, keep):
    adapters = mixed()
    result = merged_delta(adapters, "tsv_m", space, alpha=0.9, keep=keep)
    close(result, tsv_reference(deltas(adapters), WEIGHTS, 0.9, keep), 1e-4)


def test_tsv_m_on_orthogonal_tasks_is_the_sum_of_their_truncations():
    basis_out = torch.linalg.qr(torch.randn(40, 12, generator=torch.Generator().manual_seed(5)))[0]
    basis_in = torch.linalg.qr(torch.randn(30, 12, generator=torch.Generator().manual_seed(6)))[0]
    adapters, expected = [], 0
    for i, (start, rank) in enumerate([(0, 4), (4, 6), (10, 2)]):
        B = basis_out[:, start : start + rank] * torch.linspace(3, 1, rank)
        A = basis_in[:, start : start + rank].T
        adapters.append(adapter(i, rank, B=B, A=A))
        U, S, Vh = torch.linalg.svd(adapters[-1].modules[NAME].delta(), full_matrices=False)
        k = -(-rank // 2)
        expected = expected + WEIGHTS[i] * (U[:, :k] * S[:k]) @ Vh[:k]
    for space in ("core", "full"):
        close(merged_delta(adapters, "tsv_m", space, keep=0.5), expected, 1e-4)


@pytest.mark.parametrize("space", ["core", "full"])
def test_knots_with_the_linear_method_is_the_exact_sum(space):
    adapters = mixed()
    total = sum(w * t for w, t in zip(WEIGHTS, deltas(adapters), strict=True))
    close(merged_delta(adapters, "knots", space, inner="linear"), total)


def ties_reference(tasks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging as the paper writes it (Yadav et al., NeurIPS 2023, arXiv:2306.01708), in float64:
    trim each task to its top-k entries by magnitude (k = ⌊density · n⌋), elect each entry's sign as the
    sign of the sum of the trimmed tasks, and take the mean over the tasks whose trimmed entry has that sign
    (the disjoint mean). The per-task weights multiply the entries inside the mean, as PEFT does (the paper
    has one λ for the whole merge)."""
    trimmed = []
    for task in tasks:
        flat = task.double().flatten()
        keep = int(density * flat.numel())
        kept = torch.zeros_like(flat)
        top = flat.abs().topk(keep).indices
        kept[top] = flat[top]
        trimmed.append(kept.reshape(task.shape))
    elected = torch.sign(sum(trimmed))
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for weight, task in zip(weights, trimmed, strict=True):
        agrees = (torch.sign(task) == elected) & (task != 0)
        total += torch.where(agrees, weight * task, torch.zeros_like(task))
        count += agrees.double()
    return total / count.clamp(min=1)


def test_knots_ties_against_the_paper_in_the_full_space():
    adapters = mixed()
    tasks = deltas(adapters)
    U, S, Vh = torch.linalg.svd(torch.cat(tasks, dim=1).double(), full_matrices=False)
    r = int(torch.linalg.matrix_rank(torch.cat(tasks, dim=1)))
    aligned = [Vh[:r, i * 30 : (i + 1) * 30] for i in range(3)]
    expected = ((U[:, :r] * S[:r]) @ ties_reference(aligned, WEIGHTS, density=0.7)).float()
    merged = merge_adapters(adapters, WEIGHTS, "knots", space="full", density=0.7, params={"inner": "ties"})
    close(merged.modules[NAME].delta(), expected, 1e-4)


def test_matrix_methods_refuse_the_factor_space_and_unknown_parameters():
    from loramerge.errors import BadInput

    with pytest.raises(BadInput, match="needs whole matrices"):
        merge_adapters(mixed(), WEIGHTS, "iso_c", space="factors")
    with pytest.raises(BadInput, match="no parameter 'beta'"):
        merge_adapters(mixed(), WEIGHTS, "iso_c", params={"beta": 2.0})


@pytest.mark.parametrize(("method", "params"), [("iso_c", {"alpha": 1.2}), ("tsv_m", {"keep": 0.5}),
                                                ("knots", {"inner": "linear"}), ("wudi", {"alpha": 0.9}),
                                                ("dc_merge", {"keep": 0.3})])  # fmt: skip
def test_core_space_equals_full_space(method, params):
    """Every basis these methods need lies in the span of the stacked factors: the R x R cores suffice."""
    close(merged_delta(mixed(), method, "core", **params), merged_delta(mixed(), method, "full", **params), 1e-5)


def iso_cts_reference(tasks, weights, alpha, common):
    """Iso-CTS as the paper describes it: the sum's top directions (the common subspace), each task's top
    directions outside it (an equal share of the rest), both stacks orthogonalised, the mean of the kept
    singular values as one flat spectrum."""
    weighted = [w * t.double() for w, t in zip(weights, tasks, strict=True)]
    total = sum(weighted)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    r = int(torch.linalg.matrix_rank(total.float()))
    k = max(1, int(common * r))
    share = (r - k) // len(tasks)
    lefts, rights, sigmas = [U[:, :k]], [Vh[:k].T], [S[:k]]
    for t in weighted:
        rest = t - U[:, :k] @ (U[:, :k].T @ t)
        Ut, St, Vht = torch.linalg.svd(rest, full_matrices=False)
        lefts.append(Ut[:, :share]), rights.append(Vht[:share].T), sigmas.append(St[:share])

    flat = torch.cat(sigmas).mean()
    return (alpha * flat * orthogonalize(torch.cat(lefts, 1)) @ orthogonalize(torch.cat(rights, 1)).T).float()


@pytest.mark.parametrize("space", ["core", "full"])
def test_iso_cts_against_the_paper(space):
    adapters = mixed()
    result = merged_delta(adapters, "iso_cts", space, alpha=1.1, common=0.5)
    close(result, iso_cts_reference(deltas(adapters), WEIGHTS, 1.1, 0.5), 1e-4)


def test_iso_cts_with_the_whole_common_subspace_is_iso_c():
    adapters = mixed()
    close(merged_delta(adapters, "iso_cts", "core", common=1.0), merged_delta(adapters, "iso_c", "core"), 1e-5)
    close(merged_delta(adapters, "iso_cts", "core", common=0.6), merged_delta(adapters, "iso_cts", "full", common=0.6))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m", "knots", "robustmerge", "wudi", "dc_merge"])
def test_a_module_missing_from_an_adapter_contributes_nothing(method):
    """Adapter 2 lacks the second module: there the method merges the two others alone."""
    adapters = mixed()
    generator = torch.Generator().manual_seed(9)
    for a in adapters[:2]:
        a.modules["layer.other"] = LoraModule(A=torch.randn(5, 30, generator=generator),
                                              B=torch.randn(40, 5, generator=generator), scale=1.0)  # fmt: skip
    merged = merge_adapters(adapters, WEIGHTS, method, params={"inner": "linear"} if method == "knots" else {})
    pair = [LoraAdapter(modules={NAME: a.modules["layer.other"]}, config=a.config) for a in adapters[:2]]
    alone = merge_adapters(pair, WEIGHTS[:2], method, params={"inner": "linear"} if method == "knots" else {})
    close(merged.modules["layer.other"].delta(), alone.modules[NAME].delta())


def wudi_objective(merged, tasks, weights) -> float:
    """WUDI-Merging's loss as the paper writes it: Σ_i ‖(τ − w_i τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F."""
    return sum(float(((merged - w * t) @ t.T).norm() ** 2 / t.norm() ** 2) for w, t in zip(weights, tasks, strict=True))


def wudi_reference(tasks, weights):
    """The loss's minimum-norm minimiser, by least squares written from the loss itself (numpy, float64): each row
    m of τ minimises Σ_i ‖(m − w_i t_i) τ_iᵀ‖² / ‖τ_i‖², one linear least-squares problem per row."""
    import numpy as np

    tasks = [t.double().numpy() for t in tasks]
    design = np.concatenate([t.T / np.linalg.norm(t) for t in tasks], axis=1)  # in x (n · out)
    rows = []
    for r in range(tasks[0].shape[0]):
        goal = np.concatenate([w * t[r] @ t.T / np.linalg.norm(t) for w, t in zip(weights, tasks, strict=True)])
        rows.append(np.linalg.lstsq(design.T, goal, rcond=1e-5)[0])  # float32 tasks: their null space is ~1e-7
    return torch.tensor(np.stack(rows), dtype=torch.float32)


@pytest.mark.parametrize("space", ["core", "full"])
def test_wudi_is_the_minimiser_of_its_loss(space):
    adapters = mixed()
    tasks = deltas(adapters)
    result = merged_delta(adapters, "wudi", space)
    expected = wudi_reference(tasks, WEIGHTS)
    close(result, expected, 1e-4)
    loss = wudi_objective(result.double(), [t.double() for t in tasks], WEIGHTS)
    generator = torch.Generator().manual_seed(3)
    total = sum(w * t for w, t in zip(WEIGHTS, tasks, strict=True)).double()
    assert loss < wudi_objective(total, [t.double() for t in tasks], WEIGHTS)  # it moved off the plain sum
    for _ in range(3):  # and no nearby point does better
        nearby = result.double() + 1e-3 * torch.randn(result.shape, generator=generator, dtype=torch.float64)
        assert loss <= wudi_objective(nearby, [t.double() for t in tasks], WEIGHTS)
    close(merged_delta(adapters, "wudi", space, alpha=0.5), 0.5 * result)


def test_wudi_of_tasks_on_separate_inputs_is_their_weighted_sum():
    """Row spaces that do not meet: no task interferes with another, so the minimiser is the plain weighted sum; and
    one task alone is itself."""
    generator = torch.Generator().manual_seed(5)
    A = torch.linalg.qr(torch.randn(30, 13, generator=generator))[0].T  # 13 orthonormal rows, split 4 / 6 / 3
    adapters = [adapter(i, r, A=A[s : s + r]) for i, (s, r) in enumerate([(0, 4), (4, 6), (10, 3)])]
    total = sum(w * t for w, t in zip(WEIGHTS, deltas(adapters), strict=True))
    close(merged_delta(adapters, "wudi", "core"), total)
    close(merge_adapters(adapters[:1], [0.7], "wudi").modules[NAME].delta(), 0.7 * deltas(adapters)[0])


def dc_merge_reference(tasks, weights, alpha=1.0, smoothing="uniform", rho=5.0, keep=0.001):
    """DC-Merge as its paper and code describe it, in float64: per task the top-r SVD with the singular values made
    uniform (or a ramp from min(ρ, σ_1/σ_r) to 1) at the same sum; stacked U's and V's orthogonalised as
    M (MᵀM)^(-1/2); M_i = Uᵀ T̃_i V keeps its ⌊keep · size⌋ (at least 1) largest |entries|; the sign of Σ M_i is
    elected and agreeing entries averaged; only each task's own diagonal block is kept; U M Vᵀ times α."""
    lefts, rights, smoothed, ranks = [], [], [], []
    for w, t in zip(weights, tasks, strict=True):
        U, S, Vh = torch.linalg.svd(w * t.double(), full_matrices=False)
        r = int(torch.linalg.matrix_rank(t))
        S = S[:r]
        if smoothing == "uniform":
            S = torch.full_like(S, S.sum().item() / r)
        else:
            ramp = torch.linspace(min(rho, (S[0] / S[-1]).item()), 1.0, r, dtype=torch.float64)
            S = S.sum() * ramp / ramp.sum()
        lefts.append(U[:, :r]), rights.append(Vh[:r].T), ranks.append(r)
        smoothed.append(U[:, :r] @ torch.diag(S) @ Vh[:r])
    U, V = orthogonalize(torch.cat(lefts, 1)), orthogonalize(torch.cat(rights, 1))
    kept = []
    for t, r in zip(smoothed, ranks, strict=True):
        M = U.T @ t @ V
        k = max(r, int(keep * M.numel()))
        threshold = M.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(M.abs() >= threshold, M, torch.zeros_like(M)))
    total = sum(kept)
    merged = torch.zeros_like(total)
    for i in range(total.shape[0]):
        for j in range(total.shape[1]):
            agreeing = [m[i, j] for m in kept if m[i, j] != 0 and torch.sign(m[i, j]) == torch.sign(total[i, j])]
            merged[i, j] = sum(agreeing) / len(agreeing) if agreeing and total[i, j] != 0 else 0.0
    mask = torch.block_diag(*[torch.ones(r, r, dtype=torch.float64) for r in ranks])
    return (alpha * U @ (merged * mask) @ V.T).float()


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("params", [{}, {"keep": 0.2, "alpha": 1.3}, {"smoothing": "linear", "rho": 3.0, "keep": 0.5}])
def test_dc_merge_against_the_paper(space, params):
    adapters = mixed()
    close(merged_delta(adapters, "dc_merge", space, **params), dc_merge_reference(deltas(adapters), WEIGHTS, **params),
          1e-4)  # fmt: skip


@pytest.mark.parametrize("keep", [0.001, 1.0])
def test_dc_merge_of_one_task_is_its_flat_spectrum(keep):
    """One task, uniform smoothing: its own directions with its singular values made equal, Iso-C — with the
    default too, which keeps the r entries of its flat diagonal, not one of them picked by round-off."""
    lone = mixed()[:1]
    iso_c = merge_adapters(lone, [0.8], "iso_c").modules[NAME].delta()
    for space in ("core", "full"):
        close(merge_adapters(lone, [0.8], "dc_merge", space=space, params={"keep": keep}).modules[NAME].delta(), iso_c)


def test_dc_merge_of_tasks_sharing_directions_is_one_matrix():
    """Two of three adapters with the same A: the stacked right singular vectors are dependent; the partial
    isometry over their rank makes the merge one well-defined matrix, the same in both spaces."""
    generator = torch.Generator().manual_seed(11)
    A = torch.randn(4, 30, generator=generator)
    pair = [adapter(20, 4, A=A), adapter(21, 4, A=A), adapter(22, 3)]
    close(merged_delta(pair, "dc_merge", "core", keep=0.3), merged_delta(pair, "dc_merge", "full", keep=0.3))


def wudi_ridge_reference(tasks, weights, ridge):
    """WUDI's loss plus ridge · λ_max(Σ P_i) · ‖τ‖², by an augmented least squares per row (numpy, float64)."""
    import numpy as np

    tasks = [t.double().numpy() for t in tasks]
    lam = ridge * np.linalg.eigvalsh(sum(t.T @ t / np.linalg.norm(t) ** 2 for t in tasks))[-1]
    design = np.concatenate([t.T / np.linalg.norm(t) for t in tasks] + [np.sqrt(lam) * np.eye(tasks[0].shape[1])], 1)
    rows = []
    for r in range(tasks[0].shape[0]):
        goal = np.concatenate([w * t[r] @ t.T / np.linalg.norm(t) for w, t in zip(weights, tasks, strict=True)]
                              + [np.zeros(tasks[0].shape[1])])  # fmt: skip
        rows.append(np.linalg.lstsq(design.T, goal, rcond=None)[0])
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def test_wudi_with_a_ridge_tames_nearly_shared_inputs():
    """Row spaces that nearly coincide (one A, plus 1e-3 noise): the exact minimiser grows far beyond the tasks;
    a ridge keeps it near them, and is the ridge-regularised least squares of the loss, in both spaces."""
    generator = torch.Generator().manual_seed(12)
    A = torch.randn(4, 30, generator=generator)
    near = [adapter(30 + i, 4, A=A + 1e-3 * torch.randn(4, 30, generator=generator)) for i in range(3)]
    total = sum(w * t for w, t in zip(WEIGHTS, deltas(near), strict=True))
    assert merged_delta(near, "wudi", "core").norm() > 10 * total.norm()
    for space in ("core", "full"):
        ridged = merged_delta(near, "wudi", space, ridge=0.01)
        close(ridged, wudi_ridge_reference(deltas(near), WEIGHTS, 0.01), 1e-4)
    assert ridged.norm() < 2 * total.norm()


REFERENCES = {
    "iso_c": lambda tasks, weights: iso_c_reference(tasks, weights, 1.0),
    "iso_cts": lambda tasks, weights: iso_cts_reference(tasks, weights, 1.0, 0.8),
    "tsv_m": lambda tasks, weights: tsv_reference(tasks, weights, 1.0, 1 / len(tasks)),
    "knots": lambda tasks, weights: sum(w * t for w, t in zip(weights, tasks, strict=True)),
    "wudi": wudi_reference,
    # the default keeps one entry per task here, among near-equal ones (a flat spectrum): round-off picks which
    "dc_merge": lambda tasks, weights: dc_merge_reference(tasks, weights, smoothing="linear", keep=0.5),
}
PARAMS = {"knots": {"inner": "linear"}, "dc_merge": {"smoothing": "linear", "keep": 0.5}}


@pytest.mark.parametrize("method", list(REFERENCES))
def test_real_peft_adapters_with_rslora_patterns_and_embeddings(method, llama_base, mixed_adapters, tmp_path):
    """Mixed ranks, rsLoRA (scale α/√r), rank and alpha patterns, an embedding LoRA and modules missing from
    some adapters; every task matrix is PEFT's own ``get_delta_weight``, and the merge is read back by PEFT."""
    weights = [1.0, -0.5, 0.8]
    merged = merge_adapters([load_adapter(p) for p in mixed_adapters], weights, method, params=PARAMS.get(method, {}))
    save_adapter(merged, tmp_path / "merged")
    inputs = peft_with_adapters(llama_base, {f"in{i}": p for i, p in enumerate(mixed_adapters)})
    output = peft_with_adapters(llama_base, {"merged": tmp_path / "merged"})
    for name in merged.modules:
        present = [(w, peft_delta(inputs, name, f"in{i}")) for i, w in enumerate(weights)]
        present = [(w, d) for w, d in present if d is not None]
        expected = REFERENCES[method]([d for _, d in present], [w for w, _ in present])
        close(peft_delta(output, name, "merged"), expected, 1e-4)
