"""Tiny diffusion pipelines built from configs (no download), for the single-file LoRA tests."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

MODULES = {  # diffusers module path -> ((out, in), kernel or None)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ((64, 64), None),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0": ((64, 64), None),
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": ((512, 64), None),
    "down_blocks.1.attentions.0.proj_in": ((64, 64), (1, 1)),
    "down_blocks.0.resnets.0.conv1": ((32, 32), (3, 3)),
}
WEIGHTS = (0.7, -0.4)


def pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=64, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)  # fmt: skip
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=1000)  # fmt: skip
    text_encoder = CLIPTextModel(config)
    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def fused_deltas(path, make_pipeline=pipeline, component: str = "unet") -> dict[str, torch.Tensor]:
    """What diffusers' load_lora_weights + fuse_lora add to each weight of a pipeline's ``component``."""
    pipe = make_pipeline()
    model = getattr(pipe, component)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(components=[component])
    pipe.unload_lora_weights()
    return {name: p.detach() - before[name] for name, p in model.named_parameters()
            if not torch.equal(p.detach(), before[name])}  # fmt: skip


def kohya_lora_file(path, modules: dict, seed: int, rank: int, alpha: float):
    """A kohya LoRA (``<stem>.lora_down/lora_up/alpha``) as sd-scripts writes one; ``modules``: stem -> ((out, in),
    kernel or None)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for stem, ((rows, columns), kernel) in modules.items():
        down = torch.randn(rank, columns, *(kernel or ()), generator=generator) * 0.1
        up = torch.randn(rows, rank, *((1, 1) if kernel else ()), generator=generator) * 0.1
        state.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                      f"{stem}.alpha": torch.tensor(alpha)})  # fmt: skip
    save_file(state, path)
    return path


def saved_as_diffusers(pipe, component: str, folder):
    """The PEFT adapter "x" on a pipeline's ``component``, written as diffusers writes a LoRA (``save_lora_weights``
    with its config); tensors are cloned, as a trainer's are separate (diffusers' converter shares some)."""
    from peft.utils import get_peft_model_state_dict

    model = getattr(pipe, component)
    state = {key: value.clone() for key, value in get_peft_model_state_dict(model, adapter_name="x").items()}
    metadata = model.peft_config["x"].to_dict()
    pipe.save_lora_weights(
        folder, **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata}
    )
    return folder / "pytorch_lora_weights.safetensors"


def assert_weighted_sum(merged: dict, first: dict, second: dict, weights=WEIGHTS) -> None:
    """Every weight the merge moves, moved by the weighted sum of what the two inputs move it by (1e-5)."""
    for name, delta in merged.items():
        expected = weights[0] * first[name] + weights[1] * second[name]
        assert ((delta - expected).norm() / expected.norm()).item() < 1e-5, name
