"""Layer numbering from tensor names (``model.layers.7.mlp.up_proj.weight``), as transformers names them."""

from __future__ import annotations

import re

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<suffix>\..+)$")
# Non-layer tensors after the layers (final norm, output head); everything else comes before them.
_POST = re.compile(r"(^|\.)(norm|final_layernorm|final_layer_norm|ln_f|lm_head|score|head)(\.|$)")


def layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match["index"]) if match else None


def with_layer(name: str, index: int) -> str:
    match = _LAYER.match(name)
    if not match:
        raise ValueError(f"{name} is not a layer tensor")
    return f"{match['prefix']}{index}{match['suffix']}"


def layer_group(name: str) -> str:
    """``model.layers.*.mlp.up_proj.weight``: the name with its layer index replaced by ``*``."""
    match = _LAYER.match(name)
    return f"{match['prefix']}*{match['suffix']}" if match else name


def is_post_layer(name: str) -> bool:
    return layer_index(name) is None and bool(_POST.search(name))


def count_layers(names: list[str]) -> int:
    indices = {layer_index(name) for name in names} - {None}
    return max(indices) + 1 if indices else 0


def is_vocabulary_tensor(name: str) -> bool:
    return any(part in name for part in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out"))
