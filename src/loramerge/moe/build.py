"""Build a Mixtral-architecture mixture of experts from a mergekit-moe config, streamed tensor by tensor.

Attention, norms, embeddings and head come from the base; layer ``l``'s experts are the experts' MLPs
(fused as transformers 5 stores Mixtral: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, gate rows first,
and ``mlp.experts.down_proj`` ``[E, H, I]``); its router ``mlp.gate.weight`` ``[E, H]`` comes from
``gates``. Experts may be ``model+adapter`` references: the adapter is folded in as each tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from loramerge.adapters.checks import check_finite
from loramerge.adapters.options import DTYPES
from loramerge.dense.sources import ModelSource, open_source, split_reference
from loramerge.errors import BadInput
from loramerge.io.atomic import check_output_target
from loramerge.io.checkpoint import resolve_model_dir
from loramerge.io.model_card import moe_model_card
from loramerge.io.output import output_folder
from loramerge.io.shard_writer import TensorLayout
from loramerge.io.sizes import parse_size
from loramerge.moe.config import MoeConfig
from loramerge.moe.gates import cheap_embed_row, prompt_direction, random_rows

Progress = Callable[[int, int, str], None]
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "output_router_logits": False,
           "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None}  # fmt: skip


def _open(ref: str, where: str, allow_nonfinite: bool) -> ModelSource:
    try:
        source = open_source(ref, allow_nonfinite)
    except BadInput as error:
        raise BadInput(f"{where}: {error}") from None
    architectures = source.config.get("architectures") or []
    if not set(architectures) & set(ARCHITECTURES):
        raise BadInput(f"{where}: {ref} is a {architectures or 'model without architectures'}; "
                       f"experts must be {' or '.join(ARCHITECTURES)}")  # fmt: skip
    return source


def _check_experts(base: ModelSource, experts: list[ModelSource]) -> None:
    layers = base.config["num_hidden_layers"]
    for i, expert in enumerate(experts):
        for name in (f"model.layers.{layer}.mlp.{part}.weight" for layer in range(layers) for part in MLP):
            if name not in expert.checkpoint.files:
                raise BadInput(f"experts[{i}]: {expert.ref} has no {name}")
            if expert.checkpoint.layout(name)[0] != base.checkpoint.layout(name)[0]:
                raise BadInput(f"experts[{i}]: {name} of {expert.ref} is {expert.checkpoint.layout(name)[0]}, "
                               f"the base's is {base.checkpoint.layout(name)[0]}")  # fmt: skip


def _base_tokenizer(model_folder: Path):
    """The base's tokenizer with pad = BOS (EOS without one): mergekit-moe pads prompts with it and saves it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token
    return tokenizer


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens, raw text, starting with BOS (added when the tokenizer does not), as mergekit."""
    ids = tokenizer(prompt)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _left_padded(tokenizer, prompts: list[str], device: str) -> dict[str, torch.Tensor]:
    rows = [_prompt_ids(tokenizer, prompt) for prompt in prompts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def _hidden_routers(config: MoeConfig, tokenizer, layers: int, device: str) -> list[torch.Tensor]:
    """Per layer, each expert's prompt direction in the base's residual stream (bfloat16, as mergekit)."""
    from transformers import AutoModelForCausalLM

    model_ref, adapter = split_reference(config.base_model)
    if adapter:
        raise BadInput(f"base_model: gate_mode {config.gate_mode} runs the base model, which cannot be a model+adapter")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(model_ref), dtype=torch.bfloat16).to(device).eval()

    def states(prompts: list[str]) -> list[torch.Tensor] | None:
        if not prompts:
            return None
        batch = _left_padded(tokenizer, prompts, device)
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        pick = (lambda h: h.sum(dim=1) / h.shape[1]) if config.gate_mode == "hidden_avg" else (lambda h: h[:, -1])
        return [pick(hidden[layer]) for layer in range(layers)]

    rows: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    for expert in config.experts:
        positive, negative = states(expert.positive_prompts), states(expert.negative_prompts)
        for layer in range(layers):
            rows[layer].append(prompt_direction(positive[layer], negative[layer] if negative else None).cpu())
    return [torch.stack(layer) for layer in rows]


def _cheap_embed_routers(config: MoeConfig, tokenizer, base: ModelSource, layers: int) -> list[torch.Tensor]:
    embeddings = base.get("model.embed_tokens.weight")

    def tokens(prompts: list[str]) -> list[int]:
        return [token for prompt in prompts for token in _prompt_ids(tokenizer, prompt)]

    table = torch.stack([cheap_embed_row(embeddings, tokens(e.positive_prompts), tokens(e.negative_prompts))
                         for e in config.experts])  # fmt: skip
    return [table] * layers


def _layout(base: ModelSource, config: MoeConfig, dtype: torch.dtype | None) -> list[TensorLayout]:
    layers, experts = base.config["num_hidden_layers"], len(config.experts)
    result = []
    for name in base.names:
        shape, stored = base.checkpoint.layout(name)
        if ".mlp." not in name:
            result.append(TensorLayout(name, shape, dtype or stored))
    for layer in range(layers):
        (inter, hidden), stored = base.checkpoint.layout(f"model.layers.{layer}.mlp.gate_proj.weight")
        out = dtype or stored
        prefix = f"model.layers.{layer}.mlp."
        result += [TensorLayout(prefix + "gate.weight", (experts, hidden), out),
                   TensorLayout(prefix + "experts.gate_up_proj", (experts, 2 * inter, hidden), out),
                   TensorLayout(prefix + "experts.down_proj", (experts, hidden, inter), out)]  # fmt: skip
    return result


def build_moe(
    config: MoeConfig,
    output: str | Path,
    *,
    config_yaml: str | None = None,
    seed: int = 0,
    force: bool = False,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write the mixture of experts ``config`` describes to ``output`` (atomically); a NaN or Inf in any
    tensor read stops it, naming the tensor, unless ``allow_nonfinite``."""
    base = _open(config.base_model, "base_model", allow_nonfinite)
    experts = [
        _open(e.source_model, f"experts[{i}].source_model", allow_nonfinite) for i, e in enumerate(config.experts)
    ]
    _check_experts(base, experts)
    target = check_output_target(Path(output), force, [base.checkpoint.folder, *(e.checkpoint.folder for e in experts)])
    layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    model_folder = resolve_model_dir(split_reference(config.base_model)[0])
    tokenizer = _base_tokenizer(model_folder)
    generator = torch.Generator().manual_seed(seed)
    if config.gate_mode in ("random", "uniform_random"):
        routers = random_rows(layers, len(experts), hidden, generator, config.gate_mode == "uniform_random")
    elif config.gate_mode == "cheap_embed":
        routers = _cheap_embed_routers(config, tokenizer, base, layers)
    else:
        routers = _hidden_routers(config, tokenizer, layers, device)
    dtype = DTYPES[config.dtype] if config.dtype else None
    layout = _layout(base, config, dtype)
    dtypes = {item.name: item.dtype for item in layout}

    def read(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.get(name)
        if not allow_nonfinite:
            check_finite({name: tensor}, f"model {source.ref}")
        return tensor

    def mlp(expert: int, layer: int, part: str) -> torch.Tensor:
        weight = read(experts[expert], f"model.layers.{layer}.mlp.{part}.weight").to(torch.float32)
        scale = config.experts[expert].noise_scale
        return weight + scale * torch.randn(weight.shape, generator=generator) if scale else weight

    with output_folder(target, force=force) as folder:
        writer = folder.shards(layout, parse_size(shard_size))
        written = 0

        def write(name: str, tensor: torch.Tensor) -> None:
            nonlocal written
            writer.write(name, tensor.to(dtypes[name]))
            written += 1
            if progress:
                progress(written, len(layout), name)

        for name in (item.name for item in layout if ".mlp." not in item.name):  # the base's own tensors
            write(name, read(base, name))
        for layer in range(layers):
            parts = [{part: mlp(e, layer, part) for part in ("gate_proj", "down_proj", "up_proj")}
                     for e in range(len(experts))]  # fmt: skip
            fused = {
                "gate.weight": routers[layer],
                "experts.gate_up_proj": torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in parts]),
                "experts.down_proj": torch.stack([p["down_proj"] for p in parts]),
            }
            for suffix, tensor in fused.items():
                write(f"model.layers.{layer}.mlp.{suffix}", tensor)
        writer.close()
        folder.side_files(model_folder)
        folder.tokenizer(tokenizer)
        updates = {**MIXTRAL, "num_local_experts": len(experts), "num_experts_per_tok": config.experts_per_token}
        if config.dtype:
            updates["dtype"] = config.dtype
        folder.model_config(base.config, **updates)
        text = config_yaml or yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False)
        folder.text("loramerge_moe.yml", text)
        folder.card(moe_model_card(config.base_model, [e.ref for e in experts], config.gate_mode, text))
    return target
