"""One vocabulary for models whose tokenizers differ: mergekit's ``tokenizer_source`` / ``tokenizer:``
rules (its documentation, checked black-box against ``mergekit-yaml`` in tests/test_tokenizer_union.py).

The core tokenizer (the base model's, or the one named) keeps its ids. ``union`` appends every token
another model has and the core lacks, as added tokens, model by model in recipe order (mergekit's
order between models follows Python's hash seed; within a model, its own id order). Each model's
vocabulary rows (embeddings, head) are then re-indexed by token string; a token a model lacks takes
the base model's row, else the row of the one model that has it, else the plain mean of the models
that have it. Rows added by ``pad_to_multiple_of`` take each model's own mean row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from loramerge.errors import BadInput


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]  # output id -> token
    ids: dict[str, dict[str, int]]  # model ref -> its token -> its row
    core: str  # the model whose tokenizer the output extends
    padded_size: int  # rows of the output's vocabulary tensors
    tokenizer_json: str  # the core tokenizer with the appended tokens: the output's tokenizer.json

    @property
    def size(self) -> int:
        return len(self.tokens)


def read_tokenizer(ref: str, folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise BadInput(f"tokenizer_source: model {ref} has no tokenizer.json to align its vocabulary by")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own exception type for a corrupt file
        raise BadInput(f"tokenizer_source: {path} cannot be read: {error}") from None


def _by_id(vocabulary: dict[str, int]) -> list[str]:
    return [token for token, _ in sorted(vocabulary.items(), key=lambda item: item[1])]


def build_vocabulary(
    tokenizers: dict[str, Tokenizer], core: str, union: bool, pad_to_multiple_of: int | None = None
) -> Vocabulary:
    """The output vocabulary: the core's tokens, then (``union``) every other model's missing tokens, added
    to the core tokenizer (which this changes) for the output's tokenizer.json."""
    ids = {ref: tokenizer.get_vocab(with_added_tokens=True) for ref, tokenizer in tokenizers.items()}
    tokens = _by_id(ids[core])
    if sorted(ids[core].values()) != list(range(len(tokens))):
        raise BadInput(f"tokenizer_source: the ids of {core}'s tokenizer are not contiguous")
    appended: list[AddedToken] = []
    if union:
        known = set(tokens)
        for ref, tokenizer in tokenizers.items():
            flags = {added.content: added for added in tokenizer.get_added_tokens_decoder().values()}
            for token in _by_id(ids[ref]):
                if token not in known:
                    known.add(token)
                    tokens.append(token)
                    added = flags.get(token)
                    appended.append(AddedToken(token, special=added.special if added else False,
                                               normalized=added.normalized if added else False))  # fmt: skip
    merged = tokenizers[core]
    if appended and (merged.add_tokens(appended) != len(appended)
                     or merged.get_vocab_size(with_added_tokens=True) != len(tokens)):  # fmt: skip
        raise BadInput("tokenizer_source: union: the merged tokenizer did not take every appended token")
    multiple = pad_to_multiple_of or 1
    return Vocabulary(tokens, ids, core, math.ceil(len(tokens) / multiple) * multiple, merged.to_str(pretty=True))


def align_rows(vocabulary: Vocabulary, matrices: dict[str, torch.Tensor], base: str | None) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor re-indexed to the output's tokens (float32), by mergekit's rules."""
    rows = {ref: {t: r for t, r in vocabulary.ids[ref].items() if r < m.shape[0]} for ref, m in matrices.items()}
    aligned = {}
    for ref, matrix in matrices.items():
        out = torch.empty((vocabulary.padded_size, *matrix.shape[1:]), dtype=torch.float32)
        own = [(i, rows[ref][token]) for i, token in enumerate(vocabulary.tokens) if token in rows[ref]]
        if own:
            positions, sources = zip(*own, strict=True)
            out[list(positions)] = matrix[list(sources)].float()
        for i, token in enumerate(vocabulary.tokens):
            if token in rows[ref]:
                continue
            having = [other for other in matrices if token in rows[other]]
            if base is not None and base in having:
                out[i] = matrices[base][rows[base][token]]
            elif having:
                out[i] = torch.stack([matrices[o][rows[o][token]].float() for o in having]).mean(dim=0)
            else:
                raise BadInput(f"token {token!r}: no model of the recipe has a row for it")
        if vocabulary.padded_size > vocabulary.size:
            out[vocabulary.size :] = out[: vocabulary.size].mean(dim=0)
        aligned[ref] = out
    return aligned
