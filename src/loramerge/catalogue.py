"""The one catalogue of merge methods: every fact about a method is in its entry, and every other table
(CLI choices and help, recipe validation, mergekit presets, the live API's PEFT names, docs) is
derived from it. ``register`` adds a method; docs/adding-a-method.md shows how.

Torch-free: an entry names its pure function as ``"module:attribute"`` (or holds the callable), or, for the
task-vector methods, the sparsify and combine ``Steps`` it is made of; functions are loaded on first use, so
``loramerge --help`` stays fast. The defaults at the top were chosen by measurement
(``benchmarks/quality.py`` on the shipped skill adapters; the README's "Which method?").
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from loramerge.errors import BadInput

DEFAULT_METHOD = "iso_c"
DEFAULT_SPACE = "core"
DEFAULT_DENSITY = 0.95

SPACES = ("core", "full", "factors")
Level = Literal["element", "matrix", "module"]

# Where peers disagree (docs/algebra.md) the kernels take the choice as a parameter; a preset names a set.
PRESETS: dict[str, dict[str, str]] = {
    "peft": {"elect_on": "unweighted", "divisor": "count", "random_rescale": "density"},
    "mergekit": {"elect_on": "weighted", "divisor": "weight", "random_rescale": "l1"},
}


class Inputs(StrEnum):
    """What a dense recipe's method merges."""

    TASK_VECTORS = "task_vectors"  # each model minus the base (a base is required)
    MODELS = "models"  # the models' own tensors
    EITHER = "either"  # task vectors when a base is given, else the models' own tensors
    BASE_AND_MODEL = "base_and_model"  # the models' own tensors, the base first and required (slerp, nearswap)


@dataclass(frozen=True)
class Step:
    """One step of a task-vector kernel (mergekit's generalized task arithmetic: sparsification × consensus).
    A sparsify step keeps some entries of one task tensor; a combine step merges the stack of them."""

    function: str  # "package.module:attribute" (its docstring names the paper)
    defaults: Mapping[str, object] = field(default_factory=dict)  # of the step's parameters
    # sparsify: the per-input cutoff over the whole task; with it the step can run on row blocks
    cutoff: str | None = None
    random: bool = False  # sparsify: draws from a per-input generator
    consensus: bool = False  # combine: elects signs (mergekit's ``normalize`` divides by the agreeing weights)


@dataclass(frozen=True)
class Steps:
    """An element-wise method as its two steps: a key of ``SPARSIFY`` (None: every entry kept), then one of
    ``COMBINE``."""

    sparsify: str | None
    combine: str


_TIES = "TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708)"
_DARE = "DARE (Yu et al., ICML 2024, arXiv:2311.03099)"
_BREADCRUMBS = "Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv:2312.06795)"
_DELLA = "DELLA-Merging (Deep et al., 2024, arXiv:2406.11617)"
_K = "loramerge.kernels.methods:"
_SP = "loramerge.kernels.sparsify:"
_CUTOFFS = "loramerge.kernels.registry:"
SPARSIFY: dict[str, Step] = {
    "magnitude": Step(_SP + "magnitude_trim", {"rescale": "none"}, cutoff=_CUTOFFS + "trim_cutoff_of"),  # TIES
    "random": Step(_SP + "random_drop", {"rescale": "density"}, random=True),  # DARE
    "outliers": Step(_SP + "outlier_trim", {"rescale": "none"}, cutoff=_CUTOFFS + "outlier_cutoffs_of"),  # Breadcrumbs
    "ranked": Step(_SP + "ranked_drop", {"rescale": "density"}, random=True),  # DELLA's MagPrune
}
COMBINE: dict[str, Step] = {
    "sum": Step(_K + "weighted_sum", {"normalize": False}),  # Task Arithmetic
    "consensus": Step(_K + "consensus", {"majority_sign": "total", "elect_on": "unweighted", "divisor": "count"},
                      consensus=True),  # TIES' sign election and disjoint merge
}  # fmt: skip


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method as recipes and options spell it."""

    name: str
    default: object = None  # None: the method decides (normalize, rescale) or the user must give it (t)
    per_input: bool = False  # one value per input model (mergekit's model-level parameters)
    help: str = ""
    # a dense-recipe (mergekit) parameter only: adapter merges take weights as their own argument and
    # normalisation and rescaling from the preset, so an adapter recipe or option naming it is refused
    dense_only: bool = False
    # an adapter merge's value is checked when the options are built: None, or what is wrong with it
    check: Callable[[object], str | None] | None = None
    required: bool = False  # a dense recipe must give it (mergekit: "Missing required parameter")


@dataclass(frozen=True)
class Method:
    """A merge method. ``level`` is ``element`` for kernels that see a stack of task tensors element by
    element (they run in any space and on dense checkpoints); ``matrix`` for kernels on a stack of whole
    task matrices (SVDs of the tasks or of their sum: the core and full spaces, not the factors);
    ``module`` for methods computed from the factors themselves (an SVD of the sum, a concatenation):
    ``fn(terms, weights, rank)``."""

    name: str
    # "package.module:attribute", the callable itself, or (element-wise task-vector methods) its two Steps
    function: str | Callable[..., object] | Steps
    paper: str
    summary: str
    level: Level = "element"
    parameters: tuple[Parameter, ...] = ()
    linear: bool = False  # the result is linear in the tasks: merging in a shared basis is exact
    # The next four follow from the steps where the method is made of Steps.
    random: bool = False  # draws from per-input generators
    consensus: bool = False  # elects signs: mergekit's ``normalize`` divides by the agreeing weights
    # Element-wise once ``cutoff`` (per input, over the whole task tensor) is known: a caller may then run
    # the kernel on row blocks of a tensor with ``cutoffs=`` and get the whole-tensor result.
    piecewise: bool = False
    cutoff: str | Callable[..., object] | None = None
    inputs: Inputs = Inputs.TASK_VECTORS  # dense recipes
    adapters: bool = True  # offered by ``loramerge merge``, adapter recipes and the live API
    dense: bool = True  # offered by dense recipes
    exact_rank: bool = False  # adapters: the output keeps the exact sum's rank (Σ r_i) unless --rank is given
    # adapters: the result is the same whichever orthonormal bases of the tasks' spans the core space uses
    # (linear methods; kernels built from SVDs, which rotate with the basis), so any such basis may serve
    any_basis: bool = False
    adapter_density: float | None = None  # adapters: the density when none is given (None: DEFAULT_DENSITY)
    mergekit_normalize: bool = False  # mergekit's default for ``normalize``
    mergekit_rescale: bool = False  # mergekit's default for ``rescale`` (DARE/DELLA)
    peft_names: Mapping[str, str | None] = field(default_factory=dict)  # combination_type -> space it implies
    min_inputs: int = 1
    max_inputs: int | None = None
    # adapters: what it does to a single adapter (None: copies it; the density methods copy it at density 1)
    lone: str | None = None
    # adapters: needs each input's activations, the base's on a calibration file of prompts per input (RegMean);
    # its function is then called with ``grams=`` (one input Gram matrix per term)
    calibrated: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.function, Steps):
            if self.random or self.consensus or self.piecewise or self.cutoff is not None:
                raise ValueError(f"method {self.name}: random, consensus, piecewise and cutoff follow from its steps")
            steps = self.function
            if steps.sparsify not in (None, *SPARSIFY) or steps.combine not in COMBINE:
                raise ValueError(f"method {self.name}: steps are {sorted(SPARSIFY)} or None, then {sorted(COMBINE)}")
            sparsify = SPARSIFY[steps.sparsify] if steps.sparsify else None
            derived = {
                "random": bool(sparsify and sparsify.random),
                "consensus": COMBINE[self.function.combine].consensus,
                "cutoff": sparsify.cutoff if sparsify else None,
                "piecewise": not (sparsify and sparsify.random),
            }
            for name, value in derived.items():
                object.__setattr__(self, name, value)

    @property
    def steps(self) -> Steps:
        """The method's steps, or for another kernel those whose conventions it shares (its defaults)."""
        if isinstance(self.function, Steps):
            return self.function
        return Steps("random" if self.random else "magnitude", "consensus" if self.consensus else "sum")

    @functools.cached_property
    def fn(self) -> Callable[..., object]:
        if isinstance(self.function, Steps):
            sparsify = _load(SPARSIFY[self.function.sparsify].function) if self.function.sparsify else None
            return _load(_K + "SparsifyThenCombine")(sparsify, _load(COMBINE[self.function.combine].function))
        return _load(self.function)

    @functools.cached_property
    def cutoff_fn(self) -> Callable[..., object] | None:
        return _load(self.cutoff) if self.cutoff is not None else None

    @functools.cached_property
    def params(self) -> frozenset[str]:
        """The keyword parameters the kernel accepts (read for every call, on every row block)."""
        if isinstance(self.function, Steps):
            kernel, step_parameters = self.fn, _load(_K + "step_parameters")
            steps = (kernel.sparsify, kernel.combine) if kernel.sparsify else (kernel.combine,)
            return frozenset(name for step in steps for name in step_parameters(step))
        signature = inspect.signature(self.fn).parameters
        return frozenset(name for name in signature if name not in {"tasks", "weights", "generators", "cutoffs"})

    @functools.cached_property
    def kernel_defaults(self) -> dict[str, object]:
        """The catalogue's defaults of the parameters the kernel takes (no kernel has its own): its steps'
        (or the steps whose conventions it shares), then its parameters'."""
        steps = self.steps
        defaults = {**(SPARSIFY[steps.sparsify].defaults if steps.sparsify else {}), **COMBINE[steps.combine].defaults}
        defaults.update((p.name, p.default) for p in self.parameters if p.default is not None)
        return {name: value for name, value in defaults.items() if name in self.params}

    @property
    def recipe_parameters(self) -> set[str]:
        return {parameter.name for parameter in self.parameters}

    @property
    def adapter_parameters(self) -> set[str]:
        """The parameters an adapter merge may set (as options such as ``density``, or in ``params``)."""
        return {parameter.name for parameter in self.parameters if not parameter.dense_only}

    @property
    def per_input_parameters(self) -> list[str]:
        return [parameter.name for parameter in self.parameters if parameter.per_input]


def _load(reference: str | Callable[..., object]) -> Callable[..., object]:
    if not isinstance(reference, str):
        return reference
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _fraction(value: object) -> str | None:
    return None if isinstance(value, int | float) and 0 <= value <= 1 else "must be a number in [0, 1]"


def _positive_fraction(value: object) -> str | None:
    return None if isinstance(value, int | float) and 0 < value <= 1 else "must be a number in (0, 1]"


def _non_negative(value: object) -> str | None:
    return None if isinstance(value, int | float) and value >= 0 else "must be a number of at least 0"


def _at_least_one(value: object) -> str | None:
    return None if isinstance(value, int | float) and value >= 1 else "must be a number of at least 1"


def _element_method(value: object) -> str | None:
    names = [name for name, method in element_methods().items() if method.adapters]
    return None if value in names else f"must be an element-wise adapter method: {', '.join(names)}"


_WEIGHT = Parameter("weight", 1.0, per_input=True, help="the input's weight", dense_only=True)
_NORMALIZE = Parameter("normalize", help="divide by the sum of the weights", dense_only=True)
_TASK_VECTOR = (
    _WEIGHT,
    Parameter("density", 1.0, per_input=True, help="fraction of entries kept, in (0, 1]"),
    _NORMALIZE,
    Parameter(
        "rescale", help="rescale what is kept (DARE, DELLA: by the keep probability; mergekit: L1)", dense_only=True
    ),
    Parameter("lambda", 1.0, help="scale of the merged task vector", dense_only=True),
    Parameter("int8_mask", False, help="mergekit's memory option; no effect on the result", dense_only=True),
)
_GAMMA = Parameter("gamma", 0.01, per_input=True, help="fraction of the largest entries dropped as outliers")
_EPSILON = Parameter("epsilon", 0.15, per_input=True, help="spread of DELLA's keep probabilities")
_M = "loramerge.kernels.matrix:"
_ALPHA = Parameter("alpha", 1.0, help="scale of the merged update")
LARV_GATES = ("none", "tiered", "continuous")
LARV_DEFAULT_TIERS = "0.5,1,1.5"  # loramerge's choice: the paper's values could not be read


def larv_tiers(value: object) -> tuple[float, float, float]:
    """``larv_tiers``: three positive scales, ``"low,middle,high"``."""
    try:
        tiers = tuple(float(part) for part in str(value).split(","))
    except ValueError:
        tiers = ()
    if len(tiers) != 3 or not all(math.isfinite(tier) and tier > 0 for tier in tiers):
        raise ValueError("must be three positive numbers, low,middle,high (0.5,1,1.5)")
    return tiers  # type: ignore[return-value]


def _tiers(value: object) -> str | None:
    try:
        larv_tiers(value)
    except ValueError as error:
        return str(error)
    return None


# LARV (arXiv:2602.09413), an option of the whole-matrix mergers: one scale per block on every task vector,
# applied by the plan before the kernel runs (the kernels never see these parameters)
_LARV = (
    Parameter("larv", "none", help="LARV's per-block scales of every task vector, from the base's weights "
              "(needs the base): none | tiered | continuous",
              check=lambda v: None if v in LARV_GATES else f"must be one of {', '.join(LARV_GATES)}"),
    Parameter("larv_tiers", LARV_DEFAULT_TIERS, help="tiered LARV: the scales of the lowest, middle and highest "
              "third of the blocks' scores", check=_tiers),
)  # fmt: skip
_S = "loramerge.kernels.spherical:"
_SEL = "loramerge.kernels.selective:"
_REQUIRED_WEIGHT = Parameter("weight", per_input=True, help="the input's weight", dense_only=True, required=True)
_IGNORED_WEIGHT = Parameter(
    "weight", 1.0, per_input=True, help="accepted and ignored, as mergekit does", dense_only=True
)
_RAM = "RAM (Yuan et al., arXiv:2601.13572)"
_RAM_EPSILON = Parameter("epsilon", 1e-5, help="changes this small do not count")

_CATALOGUE: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the catalogue (a name already there is replaced)."""
    _CATALOGUE[method.name] = method
    return method


def unregister(name: str) -> None:
    _CATALOGUE.pop(name, None)


for _method in (
    Method("cat", "loramerge.lowrank.svd:concat_merge", "LoRA (Hu et al., ICLR 2022): Δ = Σ w_i s_i B_i A_i",
           "the exact weighted sum, factors concatenated (rank Σ r_i)", level="module", linear=True, exact_rank=True,
           dense=False, peft_names={"cat": None}),
    Method("svd", "loramerge.lowrank.svd:svd_merge", "Eckart–Young–Mirsky; PEFT's svd combination",
           "the best rank-k approximation of the exact sum, from the factors", level="module", linear=True,
           dense=False, peft_names={"svd": None}),
    Method("linear", Steps(None, "sum"),
           "Task Arithmetic (Ilharco et al., ICLR 2023); Model Soups (Wortsman et al., 2022)",
           "weighted sum (mergekit: weighted average of the models)", parameters=(_WEIGHT, _NORMALIZE), linear=True,
           inputs=Inputs.MODELS, exact_rank=True, mergekit_normalize=True, peft_names={"linear": None}),
    Method("task_arithmetic", Steps(None, "sum"), "Task Arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089)",
           "weighted sum of task vectors", parameters=_TASK_VECTOR, linear=True, exact_rank=True),
    Method("ties", Steps("magnitude", "consensus"), _TIES,
           "trim to the largest entries, elect a sign, mean of the agreeing", parameters=_TASK_VECTOR,
           mergekit_normalize=True, peft_names={"ties": None, "ties_svd": "full"},
           lone="trims its smallest entries"),
    Method("dare_linear", Steps("random", "sum"), _DARE, "random drop and rescale, then a weighted sum",
           parameters=_TASK_VECTOR, mergekit_rescale=True,
           peft_names={"dare_linear": None, "dare_linear_svd": "full"},
           lone="drops entries at random and rescales the rest"),
    Method("dare_ties", Steps("random", "consensus"), _DARE, "random drop and rescale, then TIES' sign election",
           parameters=_TASK_VECTOR, mergekit_rescale=True,
           peft_names={"dare_ties": None, "dare_ties_svd": "full"},
           lone="drops entries at random and rescales the rest"),
    Method("magnitude_prune", Steps("magnitude", "sum"), _TIES + ", trim step alone",
           "trim to the largest entries, then a weighted sum", parameters=_TASK_VECTOR,
           peft_names={"magnitude_prune": None, "magnitude_prune_svd": "full"},
           lone="trims its smallest entries"),
    Method("breadcrumbs", Steps("outliers", "sum"), _BREADCRUMBS,
           "drop the outliers and the smallest entries, then sum", parameters=(*_TASK_VECTOR, _GAMMA),
           lone="drops its largest and smallest entries"),
    Method("breadcrumbs_ties", Steps("outliers", "consensus"), _BREADCRUMBS + " with " + _TIES,
           "Breadcrumbs' trim, then TIES' sign election", parameters=(*_TASK_VECTOR, _GAMMA),
           lone="drops its largest and smallest entries"),
    Method("della", Steps("ranked", "consensus"), _DELLA, "magnitude-ranked random drop, then TIES' sign election",
           parameters=(*_TASK_VECTOR, _EPSILON), mergekit_normalize=True,
           mergekit_rescale=True, adapter_density=0.8,
           lone="drops entries at random and rescales the rest"),
    Method("della_linear", Steps("ranked", "sum"), _DELLA, "magnitude-ranked random drop, then a weighted sum",
           parameters=(*_TASK_VECTOR, _EPSILON), mergekit_rescale=True, adapter_density=0.8,
           lone="drops entries at random and rescales the rest"),
    Method("knots", _M + "knots", "KnOTS (Stoica et al., ICLR 2025, arXiv:2410.19735)",
           "the tasks aligned by one SVD of them side by side, their right factors merged by an element-wise method",
           level="matrix", parameters=(Parameter("inner", "ties", help="the element-wise method on the aligned "
           "right factors: ties, dare_ties, linear, …", check=_element_method),
           Parameter("density", 1.0, help="the inner method's", check=_positive_fraction)),
           random=True, consensus=True, exact_rank=True, dense=False,
           lone="trims it with its inner method"),
    Method("tsv_m", _M + "tsv_m", "TSV-Merge (Gargiulo et al., CVPR 2025, arXiv:2412.00081)",
           "each task's top singular vectors, stacked and orthogonalised", level="matrix",
           parameters=(_ALPHA, Parameter("keep", 0.0, help="fraction of each task's rank kept (0: 1/n)",
           check=_fraction), *_LARV),
           exact_rank=True, dense=False, any_basis=True),
    Method("iso_c", _M + "iso_c", "Iso-C (Marczak et al., ICML 2025, arXiv:2502.04959)",
           "the task arithmetic sum with a flat spectrum", level="matrix", parameters=(_ALPHA, *_LARV), exact_rank=True,
           dense=False, any_basis=True,
           lone="flattens its singular values"),
    Method("iso_cts", _M + "iso_cts", "Iso-CTS (Marczak et al., ICML 2025, arXiv:2502.04959)",
           "the sum's common subspace completed by task-specific directions, with a flat spectrum",
           level="matrix", parameters=(_ALPHA, Parameter("common", 0.8, help="fraction of the sum's rank kept as "
           "the common subspace", check=_positive_fraction), *_LARV), exact_rank=True, dense=False, any_basis=True,
           lone="flattens its singular values"),
    Method("dc_merge", _M + "dc_merge", "DC-Merge (Zhang et al., CVPR 2026, arXiv:2603.06242)",
           "smoothed task spectra in shared orthogonal bases, sparsified and sign-elected per task block",
           level="matrix", parameters=(_ALPHA,
               Parameter("smoothing", "uniform", help="each task's singular values: uniform | linear (a capped ramp)",
                         check=lambda v: None if v in ("uniform", "linear") else "must be uniform or linear"),
               Parameter("rho", 5.0, help="the linear ramp's largest ratio", check=_at_least_one),
               Parameter("keep", 0.001, help="fraction of each task's projected entries kept (at least its rank)",
                         check=_positive_fraction)),
           exact_rank=True, dense=False, any_basis=True, lone="smooths its spectrum and keeps its largest entries"),
    Method("wudi", _M + "wudi", "WUDI-Merging (Cheng et al., ICML 2025, arXiv:2503.08099)",
           "the update interfering least with each task on its own row space (solved exactly)", level="matrix",
           parameters=(_ALPHA, Parameter("ridge", 0.0, help="Tikhonov term, a fraction of the largest eigenvalue "
           "(0: the exact minimiser)", check=_non_negative)), exact_rank=True, dense=False, any_basis=True),
    Method("robustmerge", "loramerge.lowrank.robust:robust_merge",
           "RobustMerge (Zeng et al., NeurIPS 2025, arXiv:2502.17159)",
           "each task's factors pruned, rescaled per component by the mass pruned, normalised across tasks",
           level="module", parameters=(
               Parameter("density", 0.2, help="fraction of each factor's entries kept", check=_positive_fraction),
               Parameter("floor", 0.8, help="quantile of a task's scales that the smaller ones are raised to",
                         check=_fraction),
               Parameter("alpha", 1.0, help="scale of the merged update (4: the authors' 2 on each factor)")),
           exact_rank=True, dense=False, adapter_density=0.2,
           lone="prunes its factors and rescales their components"),
    Method("regmean", "loramerge.lowrank.regmean:regmean", "RegMean (Jin et al., ICLR 2023, arXiv:2212.09849)",
           "the update closest to every task's outputs on its own prompts' activations (a calibration file each)",
           level="module", parameters=(Parameter("off_diagonal", 0.9, help="fraction of the input Gram matrices' "
           "off-diagonal entries kept (the paper's α)", check=_fraction),),
           exact_rank=True, dense=False, calibrated=True),
    Method("model_stock", _K + "model_stock", "Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522)",
           "the mean moved towards the base by the inputs' angle",
           parameters=(Parameter("filter_wise", False, help="one ratio per row instead of per tensor"),),
           adapters=False, min_inputs=2),
    Method("slerp", _K + "slerp", "Spherical interpolation (Shoemake, SIGGRAPH 1985)",
           "spherical interpolation between two models",
           parameters=(Parameter("t", help="0: the base, 1: the other", required=True),),
           inputs=Inputs.BASE_AND_MODEL, adapters=False, min_inputs=2, max_inputs=2),
    Method("nuslerp", _S + "nuslerp", "mergekit's NuSLERP (Shoemake's slerp, SIGGRAPH 1985, with weights)",
           "slerp of two models (or their task vectors) at t = w_1 / (w_0 + w_1)",
           parameters=(_REQUIRED_WEIGHT,
                       Parameter("nuslerp_flatten", True, help="one vector per tensor (else per row or column)"),
                       Parameter("nuslerp_row_wise", False, help="unflattened: vectors along the first dimension")),
           inputs=Inputs.EITHER, adapters=False, min_inputs=2, max_inputs=2),
    Method("multislerp", _S + "multislerp", "mergekit's Multi-SLERP (C. Goddard)",
           "the weighted mean direction on the sphere, at the weighted mean norm",
           parameters=(_REQUIRED_WEIGHT, Parameter("normalize_weights", True, help="divide the weights by their sum"),
                       Parameter("eps", 1e-8, help="numerical floor")),
           inputs=Inputs.EITHER, adapters=False),
    Method("karcher", _S + "karcher", "Karcher mean (Karcher 1977; Wang et al., arXiv:2603.04972)",
           "the Riemannian mean of the directions, at the mean norm (the base counts as an input)",
           parameters=(_IGNORED_WEIGHT, Parameter("max_iter", 10, help="fixed-point iterations"),
                       Parameter("tol", 1e-5, help="convergence and zero-norm tolerance")),
           inputs=Inputs.MODELS, adapters=False),
    Method("sce", _SEL + "sce", "SCE, FuseChat (Wan et al., arXiv:2408.07990)",
           "select the most varying entries, weight models by their squared change, erase minority signs",
           parameters=(_IGNORED_WEIGHT, Parameter("select_topk", 1.0, help="fraction of varying entries kept"),
                       Parameter("int8_mask", False, help="mergekit's memory option; no effect on the result",
                                 dense_only=True)), adapters=False),
    Method("nearswap", _SEL + "nearswap", "NearSwap (mergekit; alchemonaut/QuartetAnemoi-70B)",
           "entries move from the base to the other model where the two are within t",
           parameters=(Parameter("t", help="the distance under which an entry is swapped", required=True),),
           inputs=Inputs.BASE_AND_MODEL, piecewise=True, adapters=False, min_inputs=2, max_inputs=2),
    Method("arcee_fusion", _SEL + "arcee_fusion", "Arcee Fusion (mergekit v0.1, Arcee AI)",
           "the other model's changes whose size × row KL divergence passes the Tukey fence",
           inputs=Inputs.BASE_AND_MODEL, adapters=False, min_inputs=2, max_inputs=2),
    Method("ram", _SEL + "ram", _RAM, "the mean of shared changes, unique changes kept",
           parameters=(_IGNORED_WEIGHT, _RAM_EPSILON), piecewise=True, adapters=False),
    Method("ramplus_tl", _SEL + "ramplus_tl", _RAM + ", RAM+ tensor-local",
           "RAM with each model's unique changes scaled up by its overlap",
           parameters=(_IGNORED_WEIGHT, Parameter("r", 0.1, help="strength of the unique-change boost"),
                       Parameter("alpha", 0.2, help="cap of the overlap ratio"), _RAM_EPSILON), adapters=False),
    Method("passthrough", _K + "passthrough", "mergekit's passthrough (layer stacking)", "one input copied",
           parameters=(Parameter("scale", 1.0, per_input=True, help="multiply the copied tensor"),), linear=True,
           piecewise=True, inputs=Inputs.MODELS, adapters=False, max_inputs=1),
):  # fmt: skip
    register(_method)


def methods() -> Iterator[Method]:
    """Every method, in catalogue order (the order of CLI help and docs)."""
    return iter(list(_CATALOGUE.values()))


def adapter_methods() -> list[str]:
    """What ``loramerge merge --method`` accepts."""
    return [method.name for method in methods() if method.adapters]


def dense_methods() -> list[str]:
    """What a dense recipe's ``merge_method`` accepts."""
    return [method.name for method in methods() if method.dense]


def method(name: str) -> Method:
    """The catalogue's entry of ``name``; an unknown name is bad input."""
    found = _CATALOGUE.get(name)
    if found is None:
        raise BadInput(f"unknown merge method {name!r}; known: {', '.join(sorted(_CATALOGUE))}")
    return found


def element_methods() -> dict[str, Method]:
    """The element-wise methods: kernels on stacks of task tensors (every space, dense recipes)."""
    return {method.name: method for method in methods() if method.level == "element"}


def matrix_methods() -> dict[str, Method]:
    """The methods whose kernels take stacks of whole task matrices (core and full spaces)."""
    return {method.name: method for method in methods() if method.level == "matrix"}


def peft_combination_types() -> dict[str, tuple[str, str | None]]:
    """PEFT's ``add_weighted_adapter`` ``combination_type`` -> (method, the space it implies)."""
    return {peft: (method.name, space) for method in methods() if method.adapters
            for peft, space in method.peft_names.items()}  # fmt: skip
