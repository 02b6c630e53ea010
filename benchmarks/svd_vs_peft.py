"""One 4096x4096 module, three rank-16 adapters: ``svd`` merge, loramerge vs PEFT's add_weighted_adapter.

    python benchmarks/svd_vs_peft.py [--size 4096] [--rank 16]

Both run in this process on the same factors; prints times, their ratio, the relative error between
the two ``B @ A`` results and the peak RSS after each, and writes them to ``benchmarks/results/svd_vs_peft.json``
and ``.md``.
"""

from __future__ import annotations

import argparse

import torch
from _common import load_averages, peak_rss_mib, timed, write_results
from peft import LoraConfig, get_peft_model

from loramerge import LoraAdapter, LoraModule, merge_adapters


class OneLinear(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(size, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    names, weights = ["a", "b", "c"], [0.5, 0.3, 0.2]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(OneLinear(args.size), config, adapter_name="a")
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.proj
    adapters = [
        LoraAdapter(
            modules={"proj": LoraModule(A=layer.lora_A[n].weight.detach(), B=layer.lora_B[n].weight.detach(),
                                        scale=layer.scaling[n])},
            config={"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": ["proj"]},
        )
        for n in names
    ]  # fmt: skip

    ours_s, merged = timed(lambda: merge_adapters(adapters, weights, method="svd"), repeat=3)
    ours_rss = peak_rss_mib()
    with torch.no_grad():
        peft_s, _ = timed(lambda: model.add_weighted_adapter(names, weights, "svd", combination_type="svd"))
    peft_rss = peak_rss_mib()
    theirs = layer.lora_B["svd"].weight.detach() @ layer.lora_A["svd"].weight.detach()
    ours = merged.modules["proj"].delta()
    error = ((ours - theirs).norm() / theirs.norm()).item()
    figures = {"size": args.size, "rank": args.rank, "loramerge_s": ours_s, "loramerge_rss_mib": ours_rss,
               "peft_s": peft_s, "peft_rss_mib": peft_rss, "speed_up": peft_s / ours_s, "relative_error": error,
               "load_average": load_averages()}  # fmt: skip
    text = markdown(figures)
    write_results("svd_vs_peft", figures, text)
    print(text)


def markdown(f: dict[str, float]) -> str:
    return (
        f"One {f['size']}×{f['size']} module, three rank-{f['rank']} adapters, `svd` to rank {f['rank']} "
        "(loramerge: best of 3; PEFT: one call; peak RSS of this process after each).\n\n"
        "| loramerge | PEFT add_weighted_adapter(svd) | speed-up | relative error of B@A vs PEFT |\n"
        "|---|---|---|---|\n"
        f"| {f['loramerge_s'] * 1000:.1f} ms, peak RSS {f['loramerge_rss_mib']:.0f} MiB "
        f"| {f['peft_s']:.1f} s, peak RSS {f['peft_rss_mib']:.0f} MiB | {f['speed_up']:.0f}× "
        f"| {f['relative_error']:.1e} |\n"
    )


if __name__ == "__main__":
    main()
