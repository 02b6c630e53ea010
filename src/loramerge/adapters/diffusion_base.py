"""The base weights a DoRA merge of single-file (diffusion) LoRAs reads its row norms from.

A base is a diffusers pipeline folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``transformer/``, each
holding ``*.safetensors``), one such component folder, or one ``.safetensors`` file of the denoiser (a UNet, or a
Flux transformer with BFL's names). Modules are found by the names the LoRA files use: diffusers paths
(``unet.down_blocks.0…to_q``) directly, kohya stems (``lora_unet_down_blocks_0_…_to_q``) by the same rule kohya
names them (the weight's path with ``_`` for ``.`` under the component's prefix). A convolution's weight is
read as the matrix ``out x (in·kh·kw)``, the shape its LoRA is merged in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from loramerge.errors import BadInput
from loramerge.io.checkpoint import safetensors_keys

# the kohya prefix of each component's modules (SD 1.x names its only text encoder lora_te_)
KOHYA_COMPONENTS = {"lora_unet_": ("unet", "transformer"), "lora_te_": ("text_encoder",),
                    "lora_te1_": ("text_encoder",), "lora_te2_": ("text_encoder_2",),
                    "lora_te3_": ("text_encoder_3",)}  # fmt: skip
DENOISERS = ("unet", "transformer")


class DiffusionBaseWeights:
    """A ``loramerge.adapters.dora.BaseReader`` over a diffusion model's safetensors, by LoRA module name."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.components = _components(Path(ref))
        self._kohya: dict[str, tuple[str, str]] = {}
        for component, files in self.components.items():
            prefixes = [prefix for prefix, names in KOHYA_COMPONENTS.items() if component in names]
            for key in files:
                if key.endswith(".weight"):
                    for prefix in prefixes:
                        self._kohya[prefix + key.removesuffix(".weight").replace(".", "_")] = (component, key)

    def _where(self, module: str) -> tuple[str, str]:
        found = self._kohya.get(module)
        if found is None:
            component, _, path = module.partition(".")
            if f"{path}.weight" in self.components.get(component, {}):
                found = (component, f"{path}.weight")
        if found is None:
            raise BadInput(f"module {module}: the base {self.ref} has no weight for it (components: "
                           f"{', '.join(sorted(self.components))})")  # fmt: skip
        return found

    def _stored_shape(self, module: str) -> list[int]:
        component, key = self._where(module)
        with safe_open(self.components[component][key], framework="pt") as handle:
            return handle.get_slice(key).get_shape()

    def shape(self, module: str) -> tuple[int, ...]:
        shape = self._stored_shape(module)
        return (shape[0], int(torch.tensor(shape[1:]).prod())) if len(shape) > 2 else tuple(shape)

    def kernel(self, module: str) -> list[int]:
        """A convolution's (in, kh, kw), from its weight; [] for a linear layer or a module the base lacks."""
        try:
            shape = self._stored_shape(module)
        except BadInput:
            return []
        return list(shape[1:]) if len(shape) == 4 else []

    def weight(self, module: str) -> torch.Tensor:
        component, key = self._where(module)
        with safe_open(self.components[component][key], framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float32).flatten(1)


def _components(base: Path) -> dict[str, dict[str, Path]]:
    """Each component's tensor names and files: a pipeline folder's subfolders, or one component (a folder or a
    ``.safetensors`` file, taken as the denoiser)."""
    if base.is_file() and base.suffix == ".safetensors":
        return {component: _keys([base]) for component in DENOISERS}
    if not base.is_dir():
        raise BadInput(f"base {base}: no such folder or .safetensors file (a diffusers pipeline or component folder)")
    found = {sub.name: _keys(sorted(sub.glob("*.safetensors"))) for sub in sorted(base.iterdir())
             if sub.is_dir() and any(sub.glob("*.safetensors"))}  # fmt: skip
    if found:
        return found
    own = sorted(base.glob("*.safetensors"))
    if not own:
        raise BadInput(f"base {base}: no .safetensors weights in it or in its component folders")
    return {component: _keys(own) for component in DENOISERS}


def _keys(files: list[Path]) -> dict[str, Path]:
    return {key: path for path in files for key in safetensors_keys(path, "base")}
