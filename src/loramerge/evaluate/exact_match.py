"""Loss, perplexity and greedy exact match of causal LMs on evaluation samples (``loramerge eval``), and
greedy generation (``loramerge generate``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from loramerge.errors import BadInput
from loramerge.evaluate.data import Sample

Progress = Callable[[int, int, str], None]


class Role(StrEnum):
    """What an evaluated model is in a comparison of a merge with its inputs."""

    MODEL = "model"  # evaluated alone
    BASE = "base"
    ADAPTER = "adapter"  # one input adapter on the base
    MERGED = "merged"


@dataclass
class EvalResult:
    name: str
    loss: float  # mean negative log-likelihood per scored token
    perplexity: float
    exact_match: float | None  # greedy completion == reference (prompt/completion data only)
    samples: int
    tokens: int
    data: str = ""  # the evaluation set's name (its file stem), when several are evaluated
    role: Role = Role.MODEL


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def padded_batch(rows: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``rows`` padded to one length (on the left for generation)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _scorable(prompt: list[int], target: list[int]) -> bool:
    return bool(target) and len(prompt) + len(target) >= 2


@dataclass(frozen=True)
class Scored:
    nll: float  # summed over the target tokens
    tokens: int
    greedy: list[int]  # the model's argmax after each target prefix (teacher forcing)


def score_batch(model, rows: list[tuple[list[int], list[int]]], pad: int) -> list[Scored]:
    """Summed NLL of each row's target tokens given its prompt, how many tokens were scored, and the
    greedy token at each target position. One forward pass, left-padded so that every row's targets
    end at the last position and the head only computes logits there."""
    results = [Scored(0.0, 0, [])] * len(rows)
    scored = [i for i, (prompt, target) in enumerate(rows) if _scorable(prompt, target)]
    if not scored:
        return results
    device = next(model.parameters()).device
    ids, mask = padded_batch([rows[i][0] + rows[i][1] for i in scored], pad, left=True, device=device)
    keep = max(len(rows[i][1]) for i in scored) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    width = ids.shape[1]
    keep = min(keep, width)
    log_probs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
    for row, i in enumerate(scored):
        prompt, target = rows[i]
        count = min(len(target), len(prompt) + len(target) - 1)  # a lone target's first token has no context
        # logits at column j predict token j + 1; the last `count` tokens sit at columns width-count .. width-1
        predicting = log_probs[row, keep - 1 - count : keep - 1]
        picked = predicting.gather(1, ids[row, width - count :, None])
        results[i] = Scored(-picked.sum().item(), count, predicting.argmax(-1).tolist())
    return results


def greedy_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: list[int]) -> list[str]:
    """Greedy continuations of left-padded prompts; each is cut to its own ``max_new_tokens``."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    ids, mask = padded_batch(prompts, pad, left=True, device=device)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new_tokens), do_sample=False, pad_token_id=pad
        )
    new = output[:, ids.shape[1] :]
    return [tokenizer.decode(new[i, :count], skip_special_tokens=True) for i, count in enumerate(max_new_tokens)]


def greedy_completion(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    return greedy_batch(model, tokenizer, [prompt], [max_new_tokens])[0]


def match_from_scores(tokenizer, target: list[int], greedy: list[int], reference: str) -> bool | None:
    """Whether the greedy completion (as many tokens as the reference) equals the reference, when the
    teacher-forced argmaxes already decide it; ``None`` when only generating can tell.

    Greedy decoding follows the reference as long as the argmax equals the reference token, so it
    reproduces the reference exactly when every argmax does. At the first disagreement it emits that
    argmax; if the text up to it, stripped, is not a prefix of the stripped reference, no continuation
    can make the completion equal the reference."""
    reference = reference.strip()
    first = next((k for k, (want, got) in enumerate(zip(target, greedy, strict=True)) if want != got), None)
    if first is None:
        return tokenizer.decode(target, skip_special_tokens=True).strip() == reference
    head = tokenizer.decode([*target[:first], greedy[first]], skip_special_tokens=True)
    if head.strip() and "\ufffd" not in head and not reference.startswith(head.strip()):
        return False
    return None


def evaluate(
    model,
    tokenizer,
    samples: list[Sample],
    name: str,
    progress: Progress | None = None,
    batch_size: int = 64,
    data: str = "",
) -> EvalResult:
    """Token-weighted mean loss, its perplexity and (with prompts) greedy exact-match accuracy, computed
    ``batch_size`` samples at a time: one forward pass per batch decides both, and greedy generation
    runs only for the rare rows the teacher-forced argmaxes leave undecided."""
    total, count, matches = 0.0, 0, 0
    with_prompts = any(sample.prompt for sample in samples)
    pad = pad_id(tokenizer)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        rows = []
        for sample in batch:
            prompt = _ids(tokenizer, sample.prompt, special=True)
            rows.append((prompt, _ids(tokenizer, sample.completion, special=not prompt)))
        scores = score_batch(model, rows, pad)
        for score in scores:
            total, count = total + score.nll, count + score.tokens
        if with_prompts:
            undecided = []
            for sample, (prompt, target), score in zip(batch, rows, scores, strict=True):
                if not (prompt and target):
                    continue
                decided = match_from_scores(tokenizer, target, score.greedy, sample.completion)
                if decided is None:
                    undecided.append((sample, prompt, target))
                matches += bool(decided)
            if undecided:
                answers = greedy_batch(model, tokenizer, [p for _, p, _ in undecided], [len(t) for *_, t in undecided])
                matches += sum(a.strip() == s.completion.strip() for a, (s, *_) in zip(answers, undecided, strict=True))
        if progress is not None:
            progress(start + len(batch), len(samples), f"{name} on {data}" if data else name)
    loss = total / count if count else float("nan")
    return EvalResult(
        name=name, loss=loss, perplexity=math.exp(loss) if count else float("nan"),
        exact_match=matches / len(samples) if with_prompts and samples else None, samples=len(samples), tokens=count,
        data=data,
    )  # fmt: skip


def generate_text(model, tokenizer, prompt: str, *, chat: bool = False, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (through the tokenizer's chat template with ``chat``)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise BadInput("`chat`: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = _ids(tokenizer, text, special=False)
    else:
        ids = _ids(tokenizer, prompt, special=True)
    if not ids:
        raise BadInput("`prompt`: empty after tokenization")
    return greedy_completion(model, tokenizer, ids, max_new_tokens)
