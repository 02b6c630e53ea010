"""Single-file LoRAs of the diffusion world, read and written without a base model (DoRA's merge reads the base's
row norms, ``loramerge.adapters.diffusion_base``).

- **kohya** (sd-scripts, A1111, ComfyUI): keys ``<name>.lora_down.weight`` (r x in, or r x in x kh x kw for a
  convolution), ``<name>.lora_up.weight`` (out x r, or out x r x 1 x 1) and ``<name>.alpha``, where ``<name>`` is
  the module's path with ``.`` replaced by ``_`` under ``lora_unet_``, ``lora_te_`` (``lora_te1_``/``lora_te2_`` for
  SDXL's two text encoders). The delta is ``alpha / r · up @ down``; a missing alpha means ``alpha = r``. LyCORIS
  writes its LoHa and LoKr factors (``hada_…``, ``lokr_…``), Tucker cores and DoRA's ``dora_scale`` under the same
  names.
- **diffusers** (``pytorch_lora_weights.safetensors``): PEFT keys under ``unet.``, ``text_encoder.``,
  ``text_encoder_2.`` or ``transformer.`` (``….lora_A.weight``, ``….lora_B.weight``), each component's rank and alpha
  in the header's ``lora_adapter_metadata`` (PEFT ``LoraConfig`` fields prefixed by the component); without it,
  ``alpha = r``. DoRA's magnitudes are ``….lora_magnitude_vector``.

A convolution is merged as the matrix ``up.flatten(1) @ down.flatten(1)`` (its delta, reshaped, as kohya, LyCORIS,
PEFT and diffusers compute it), and its kernel shape is kept to write it back in 4-D. Outputs fold each module's
scale into its up/B factor and state ``alpha = r``: every tool reads the same exact delta.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loramerge.adapters.checks import check_finite
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.errors import BadInput
from loramerge.io.atomic import atomic_output_file, check_output_file
from loramerge.io.checkpoint import safetensors_keys

KOHYA, DIFFUSERS = "kohya", "diffusers"
FORMATS = (KOHYA, DIFFUSERS)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the components' LoRA configs
WRITER_KEY = "loramerge_version"
KERNELS_KEY = "loramerge_kernels"  # config entry: convolution module -> its down factor's (in, kh, kw)
FORMAT_KEY = "loramerge_format"


def is_single_file(ref: str | Path) -> bool:
    return str(ref).endswith(".safetensors") and Path(ref).is_file()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own errors for corrupt or truncated files
        raise BadInput(f"adapter {path}: not a readable safetensors file ({error})") from None


def formats_of(refs: list[str]) -> set[str]:
    """The formats of single-file LoRAs, from their keys alone (no tensor is read)."""
    return {file_format(safetensors_keys(ref, "adapter"), str(ref)) for ref in refs}


def file_format(keys: list[str], source: str) -> str:
    """kohya or diffusers, from the keys; anything else is refused by name."""
    if keys and all(key.startswith(KOHYA_PREFIXES) for key in keys):
        return KOHYA
    if keys and all(key.split(".", 1)[0] in COMPONENTS for key in keys):
        return DIFFUSERS
    odd = next((key for key in keys if not key.startswith(KOHYA_PREFIXES)), keys[0] if keys else "none")
    raise BadInput(f"adapter {source}: not a kohya or diffusers LoRA file (key {odd!r})")


def _module(down: torch.Tensor, up: torch.Tensor, alpha: float, name: str, source: str) -> tuple[LoraModule, list]:
    rank = down.shape[0]
    if up.shape[1] != rank or up.dim() != down.dim() or (down.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise BadInput(
            f"adapter {source}: module {name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not pair"
        )
    kernel = list(down.shape[1:]) if down.dim() == 4 else []
    return LoraModule(A=down.flatten(1), B=up.flatten(1), scale=alpha / rank), kernel


KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}
LYCORIS_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                 "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}  # fmt: skip
# a Tucker core and the factors it joins: LyCORIS then stores both as r x out and r x in
TUCKER_CORES = {"hada_t1": ("hada_w1_a", "hada_w1_b"), "hada_t2": ("hada_w2_a", "hada_w2_b"),
                "lokr_t2": ("lokr_w2_a", "lokr_w2_b")}  # fmt: skip
KERNEL_SIDES = ("hada_w1_b", "hada_w2_b", "lokr_w2", "lokr_w2_b")  # the factors a convolution's kernel shape is in


def tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored convolution (Kim et al., "Compression of Deep Convolutional Neural Networks", ICLR 2016,
    as LyCORIS and kohya's LoCon use it): ``ΔW[p, c, k, l] = Σ_ij up[p, i] core[i, j, k, l] down[j, c]`` is the
    product of ``up`` (out x r) and this r x in x kh x kw down factor, ``Σ_j core[i, j, k, l] down[j, c]``."""
    return torch.einsum("ijkl,jc->ickl", core.to(torch.float32), down.flatten(1).to(torch.float32))


def _lycoris_matrices(name: str, parts: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list]:
    """LyCORIS factors as the 2-D ones PEFT's LoHa and LoKr builders take, and a convolution's down-factor shape
    (in, kh, kw), or [] where the file does not show it. A 4-D down factor (or LoKr's full ``lokr_w2``) is
    flattened, as LyCORIS' own ``diff_weight`` reshapes it; a Tucker core is contracted into its down factor."""
    matrices = dict(parts)
    for core_key, (up_key, down_key) in TUCKER_CORES.items():
        core = matrices.pop(core_key, None)
        if core is None:
            continue
        up, down = matrices.get(up_key), matrices.get(down_key)
        if up is None or down is None or core.dim() != 4 or tuple(core.shape[:2]) != (up.shape[0], down.shape[0]):
            shapes = ", ".join(
                f"{key} {tuple(t.shape)}" for key, t in parts.items() if key in (core_key, up_key, down_key)
            )
            raise BadInput(f"adapter {source}: module {name}: Tucker factors {shapes} do not pair")
        matrices[up_key], matrices[down_key] = up.T, tucker_down(core, down)
    kernel: list = []
    for key, tensor in matrices.items():
        if tensor.dim() == 4 and key in KERNEL_SIDES:
            kernel = list(tensor.shape[1:])
            if key.startswith("lokr"):  # kron(W1, W2): the input channels are W1's columns times W2's
                first = matrices.get("lokr_w1", matrices.get("lokr_w1_b"))
                kernel[0] *= first.shape[1] if first is not None else 1
        elif tensor.dim() not in (2, 4) or (tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1)):
            raise BadInput(f"adapter {source}: module {name}: {key} of shape {tuple(tensor.shape)} is not a factor of "
                           "a linear or 2-D convolution layer")  # fmt: skip
    return {key: tensor.flatten(1).contiguous() for key, tensor in matrices.items()}, kernel


def _lycoris_module(name: str, parts: dict[str, torch.Tensor], source: str) -> tuple[LoraModule, list]:
    """A LyCORIS LoHa or LoKr module as exact factors (PEFT's builders share its tensor names and shapes), and its
    convolution kernel. LyCORIS scales by ``alpha / r`` with ``r`` the decomposed factors' rank; a LoKr of two full
    sides ignores alpha."""
    from loramerge.adapters.peft_types import TYPES

    factors, kernel = _lycoris_matrices(name, {key: t for key, t in parts.items() if key != "alpha"}, source)
    if "hada_w1_a" in parts:
        rank = parts["hada_w1_b"].shape[0] if "hada_w1_b" in parts else 1
        kind = "LOHA"
    else:
        decomposed = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        rank = decomposed.shape[0] if decomposed is not None else None
        kind = "LOKR"
    alpha = float(parts["alpha"]) if "alpha" in parts and rank is not None else 0.0
    alpha = alpha or float(rank or 1)  # LyCORIS: no alpha, or 0, means alpha = r
    config = {"peft_type": kind, "r": rank or 1, "alpha": alpha}
    return TYPES[kind].build(name, factors, config, source), kernel


def _kohya_modules(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, LoraModule], dict[str, list]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        if part not in KOHYA_PARTS and part not in LYCORIS_PARTS:
            known = "kohya LoRA and LoCon: lora_down, lora_up, lora_mid, alpha, dora_scale; LyCORIS LoHa and LoKr"
            raise BadInput(f"adapter {source}: tensor {key!r} is not read yet ({known})")
        parts.setdefault(name, {})[part] = tensor
    modules, kernels = {}, {}
    for name, found in sorted(parts.items()):
        dora_scale = found.pop("dora_scale", None)
        if set(found) & LYCORIS_PARTS:
            modules[name], kernel = _lycoris_module(name, found, source)
        else:
            modules[name], kernel = _locon_module(name, found, source)
        if dora_scale is not None:
            modules[name] = _with_dora_scale(modules[name], dora_scale, name, source)
        if kernel:
            kernels[name] = kernel
    return modules, kernels


def _with_dora_scale(
    module: LoraModule, dora_scale: torch.Tensor, name: str, source: str, what: str = "dora_scale"
) -> LoraModule:
    """LyCORIS' DoRA (``weight_decompose``): ``W' = (W0 + Δ) · dora_scale / ‖W0 + Δ‖``. With one norm per output
    row (``dora_scale`` out x 1, LyCORIS' ``wd_on_out``) it is PEFT's DoRA of magnitude ``dora_scale``; one norm
    per input column (1 x in) is another decomposition, refused by name."""
    rows = module.B.shape[0]
    shape = tuple(dora_scale.shape)
    if dora_scale.dim() >= 2 and shape[0] == rows and dora_scale.numel() == rows:
        return replace(module, magnitude=dora_scale.flatten())
    if dora_scale.dim() >= 2 and shape[0] == 1 and rows > 1:
        raise BadInput(f"adapter {source}: module {name}: {what} {shape} holds a norm per input column "
                       "(LyCORIS' wd_on_out=False); only DoRA with a norm per output row (out x 1) merges")  # fmt: skip
    raise BadInput(f"adapter {source}: module {name}: {what} {shape} does not match its {rows} output rows")


def _locon_module(name: str, found: dict[str, torch.Tensor], source: str) -> tuple[LoraModule, list]:
    """A kohya LoRA or LoCon module: down, up, alpha, and for a Tucker convolution a ``lora_mid`` core."""
    if "lora_down.weight" not in found or "lora_up.weight" not in found:
        raise BadInput(f"adapter {source}: module {name} lacks its lora_down or lora_up weight")
    down, up = found["lora_down.weight"], found["lora_up.weight"]
    if "lora_mid.weight" in found:
        mid = found["lora_mid.weight"]
        if mid.dim() != 4 or down.dim() != 4 or tuple(down.shape[2:]) != (1, 1) or mid.shape[1] != down.shape[0]:
            raise BadInput(f"adapter {source}: module {name}: lora_mid {tuple(mid.shape)} and lora_down "
                           f"{tuple(down.shape)} do not pair")  # fmt: skip
        down, up = tucker_down(mid, down), up.to(torch.float32)
    alpha = float(found["alpha"]) if "alpha" in found else 0.0
    alpha = alpha or float(down.shape[0])  # kohya: no alpha, or 0, means alpha = r (scale 1)
    return _module(down, up, alpha, name, source)


def _pattern_value(patterns: dict, name: str, default: object) -> object:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: a key matches a module path ending with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _diffusers_modules(state, metadata: dict[str, str], source: str):
    configs = json.loads(metadata.get(METADATA_KEY, "{}") or "{}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"),
                             (".lora.up.weight", "B"), (".lora_magnitude_vector", "M"),
                             (".lora_magnitude_vector.weight", "M")):  # fmt: skip
            if key.endswith(suffix):
                parts.setdefault(key.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise BadInput(f"adapter {source}: tensor {key!r} is not a LoRA factor (lora_A, lora_B)")
    modules, kernels = {}, {}
    for name, found in sorted(parts.items()):
        magnitude = found.pop("M", None)
        if set(found) != {"A", "B"}:
            raise BadInput(f"adapter {source}: module {name} lacks its lora_A or lora_B weight")
        component, _, path = name.partition(".")
        rank = found["A"].shape[0]
        alpha = float(_pattern_value(configs.get(f"{component}.alpha_pattern") or {}, path,
                                     configs.get(f"{component}.lora_alpha", rank)))  # fmt: skip
        if configs.get(f"{component}.use_rslora"):
            alpha = alpha * rank**0.5  # PEFT's rsLoRA scale alpha / sqrt(r), as alpha' / r
        modules[name], kernel = _module(found["A"], found["B"], alpha, name, source)
        if magnitude is not None:  # PEFT's DoRA, as diffusers saves it
            modules[name] = _with_dora_scale(modules[name], magnitude.reshape(-1, 1), name, source,
                                             "lora_magnitude_vector")  # fmt: skip
        if kernel:
            kernels[name] = kernel
    return modules, kernels


def load_single_file(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """A kohya or diffusers LoRA file as a ``LoraAdapter`` named by its keys (kohya stems, or diffusers paths)."""
    path = Path(path)
    source = str(path)
    state, metadata = _read(path)
    if not allow_nonfinite:
        check_finite(state, f"adapter {source}")
    fmt = file_format(list(state), source)
    modules, kernels = (_kohya_modules if fmt == KOHYA else _diffusers_modules)(
        state, *(() if fmt == KOHYA else (metadata,)), source
    )
    ranks = sorted({m.rank for m in modules.values()})
    config = {"peft_type": "LORA", "r": ranks[-1], "lora_alpha": ranks[-1], FORMAT_KEY: fmt, KERNELS_KEY: kernels,
              "use_dora": any(module.dora for module in modules.values())}  # fmt: skip
    # Tucker cores and LyCORIS products are computed in float32; the merge is written in the file's own dtype
    stored = {tensor.dtype for tensor in state.values() if tensor.dim() > 0 and tensor.is_floating_point()}
    adapter = LoraAdapter(modules=modules, config=config, source=source,
                          stored_dtype=stored.pop() if len(stored) == 1 else None)  # fmt: skip
    adapter.path = path
    return adapter


def default_format(formats: set[str]) -> str:
    """What a merge of single files writes by default: their own format, kohya where they differ."""
    return formats.pop() if len(formats) == 1 else KOHYA


def single_file_inputs(
    adapters: list[LoraAdapter], fmt: str, base: str | None = None
) -> tuple[list[LoraAdapter], dict[str, list]]:
    """Single-file adapters named as ``fmt`` writes them (diffusers paths join kohya files under kohya names; kohya
    names have no diffusers paths without the model), and the convolutions' down-factor shapes: from the files, and
    from ``base`` (a diffusion model) for the convolutions whose factors LyCORIS stored flat."""
    if fmt == KOHYA:
        adapters = as_kohya_names(adapters)
    elif named := [adapter.name for adapter in adapters if adapter.config.get(FORMAT_KEY) != DIFFUSERS]:
        raise BadInput(f"{named[0]} names its modules kohya's way, which cannot be turned into diffusers module paths "
                       "without the model; write it in kohya's format (diffusers' load_lora_weights reads kohya "
                       "files)")  # fmt: skip
    kernels = {name: kernel for adapter in adapters for name, kernel in adapter.config.get(KERNELS_KEY, {}).items()}
    if base is not None:
        from loramerge.adapters.diffusion_base import DiffusionBaseWeights

        reader = DiffusionBaseWeights(base)
        names = {name for adapter in adapters for name in adapter.modules} - set(kernels)
        kernels.update({name: kernel for name in sorted(names) if (kernel := reader.kernel(name))})
    return adapters, kernels


def kohya_name(name: str, two_text_encoders: bool) -> str:
    """A diffusers module path as kohya's key stem (``unet.down_blocks.0…to_q``: ``lora_unet_down_blocks_0_…_to_q``)."""
    if name.startswith(KOHYA_PREFIXES):
        return name
    component, _, path = name.partition(".")
    if component == "transformer":
        raise BadInput(f"module {name}: kohya names a transformer's (Flux's) modules its own way, not by their "
                       "diffusers paths; write it in diffusers' format")  # fmt: skip
    prefix = {"unet": "lora_unet", "text_encoder_2": "lora_te2",
              "text_encoder": "lora_te1" if two_text_encoders else "lora_te"}[component]  # fmt: skip
    return f"{prefix}_{path.replace('.', '_')}"


def as_kohya_names(adapters: list[LoraAdapter]) -> list[LoraAdapter]:
    """The adapters with diffusers module paths renamed to kohya stems (to merge with kohya files); SDXL's first
    text encoder is ``lora_te1_`` where any input has a second one."""
    two = any(name.startswith(("text_encoder_2.", "lora_te2_")) for adapter in adapters for name in adapter.modules)
    return [_renamed(adapter, two) for adapter in adapters]


def _renamed(adapter: LoraAdapter, two: bool) -> LoraAdapter:
    rename = {name: kohya_name(name, two) for name in adapter.modules}
    kernels = {rename[name]: kernel for name, kernel in adapter.config.get(KERNELS_KEY, {}).items()}
    config = {**adapter.config, FORMAT_KEY: KOHYA, KERNELS_KEY: kernels}
    renamed = LoraAdapter(modules={rename[n]: m for n, m in adapter.modules.items()}, config=config,
                          source=adapter.source, stored_dtype=adapter.stored_dtype)  # fmt: skip
    renamed.path = adapter.path
    return renamed


def written_by_loramerge(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as handle:
            return WRITER_KEY in (handle.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def _kohya_tensors(name: str, rank: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's kohya tensors; its scale is in ``up``, so ``alpha`` is its rank."""
    if not name.startswith(KOHYA_PREFIXES):
        raise BadInput(f"module {name}: no kohya name")
    state = {f"{name}.lora_down.weight": tensors["down"], f"{name}.lora_up.weight": tensors["up"],
             f"{name}.alpha": torch.tensor(float(rank), dtype=tensors["down"].dtype)}  # fmt: skip
    if "magnitude" in tensors:  # LyCORIS' name and (out x 1) shape for DoRA's magnitude
        state[f"{name}.dora_scale"] = tensors["magnitude"]
    return state


def _diffusers_configs(ranks_by_component: dict[str, dict[str, int]], dora: set[str]) -> dict[str, object]:
    """The ``lora_adapter_metadata`` of a diffusers file: each component's PEFT ``LoraConfig`` fields (its largest
    rank, the others as a pattern, alpha equal to rank as every scale is in ``lora_B``)."""
    entries: dict[str, object] = {}
    for component, ranks in ranks_by_component.items():
        top = max(ranks.values())
        others = {path: rank for path, rank in ranks.items() if rank != top}
        entries.update({f"{component}.r": top, f"{component}.lora_alpha": top, f"{component}.rank_pattern": others,
                        f"{component}.alpha_pattern": others, f"{component}.target_modules": sorted(ranks),
                        f"{component}.use_dora": component in dora})  # fmt: skip
    return entries


def check_single_file_target(target: Path, force: bool, inputs: list[Path] = ()) -> Path:
    """An output ``.safetensors`` file: not a folder, not an input, not existing without ``force``, and replaced
    only where loramerge wrote it."""
    return check_output_file(target, force, inputs, suffix=".safetensors", what="single-file LoRA", ours="LoRA file",
                             written_by_loramerge=written_by_loramerge)  # fmt: skip


def save_single_file(
    adapter: LoraAdapter,
    path: str | Path,
    fmt: str,
    kernels: dict[str, list],
    *,
    force: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``adapter`` as one kohya or diffusers LoRA file, atomically; each module's scale is folded into its
    up (B) factor and its alpha equals its rank. ``kernels``: the convolutions' down-factor shapes."""
    from importlib.metadata import version

    if fmt not in FORMATS:
        raise BadInput(f"`format` must be one of {', '.join(FORMATS)}, got {fmt!r}", param="format")
    target = check_single_file_target(Path(path), force)
    if adapter.dense or any(m.bias is not None for m in adapter.modules.values()):
        raise BadInput("a single-file LoRA holds LoRA factors (and DoRA's magnitudes): no lora_bias or saved modules")
    state: dict[str, torch.Tensor] = {}
    metadata = {WRITER_KEY: version("loramerge"), "format": "pt"}
    configs: dict[str, dict[str, int]] = {}
    dora: set[str] = set()
    for name, module in sorted(adapter.modules.items()):
        kernel = kernels.get(name, [])
        one_by_one = [1, 1] if kernel else []
        tensors = {"down": module.A.reshape(module.rank, *kernel) if kernel else module.A,
                   "up": (module.scale * module.B.to(torch.float32)).reshape(*module.B.shape, *one_by_one)}  # fmt: skip
        if module.magnitude is not None:  # kohya (LyCORIS): out x 1 (x 1 x 1); PEFT: out, or 1 x out x 1 x 1 (conv)
            shape = [1, -1, 1, 1] if fmt == DIFFUSERS and kernel else [-1, *([1, *one_by_one] if fmt == KOHYA else [])]
            tensors["magnitude"] = module.magnitude.reshape(shape)
        tensors = {part: tensor.to(dtype or module.A.dtype).contiguous() for part, tensor in tensors.items()}
        if fmt == KOHYA:
            state.update(_kohya_tensors(name, module.rank, tensors))
            continue
        component, _, module_path = name.partition(".")
        if component not in COMPONENTS:
            raise BadInput(f"module {name}: kohya names cannot be turned into diffusers module paths without the "
                           "model; write it in kohya's format")  # fmt: skip
        parts = {"down": "lora_A.weight", "up": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
        state.update({f"{name}.{parts[part]}": tensor for part, tensor in tensors.items()})
        configs.setdefault(component, {})[module_path] = module.rank
        if module.magnitude is not None:
            dora.add(component)
    if fmt == DIFFUSERS:
        metadata[METADATA_KEY] = json.dumps(_diffusers_configs(configs, dora))
    with atomic_output_file(target) as staging:
        save_file(state, staging, metadata=metadata)
    return target
