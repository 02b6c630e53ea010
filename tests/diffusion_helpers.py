"""Tiny diffusion pipelines built from configs (no download), for the single-file LoRA tests."""

from __future__ import annotations

import torch

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
