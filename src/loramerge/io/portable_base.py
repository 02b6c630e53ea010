"""A base model others can load: outputs name, in ``base_model_name_or_path``, the model a GGUF base was
converted from (its Hub id, which PEFT's ``AutoPeftModel`` and transformers resolve) and keep loramerge's own
reference (``pkg:…``, a ``.gguf`` path) in the model card's metadata, where PEFT does not look."""

from __future__ import annotations

LOCAL_KEY = "loramerge_base"  # model card metadata: the reference loramerge reads the base from


def portable_base(ref: str | None) -> tuple[str | None, str | None]:
    """``(what PEFT and transformers should see, loramerge's reference where it differs)``: a GGUF reference
    becomes the Hub id of its source model, when its metadata names one; anything else stays as it is."""
    from loramerge.errors import BadInput
    from loramerge.io.gguf import gguf_path, is_gguf_reference, source_model_id

    if not ref or not is_gguf_reference(ref):
        return ref, None
    try:
        repository = source_model_id(gguf_path(ref))
    except BadInput:  # the file is not here: keep the reference as it is
        return ref, None
    return (repository, ref) if repository else (ref, None)


def card_with_local_base(card: str | None, local: str | None, base: str | None) -> str | None:
    """The model card with loramerge's reference to the base in its metadata (a bare card if there was none),
    or, with no ``local``, without one (a card copied from an input may name that input's base)."""
    from huggingface_hub import ModelCard, ModelCardData

    if card is None:
        if local is None:
            return None
        card = f"---\n{ModelCardData(base_model=base, library_name='peft').to_yaml()}\n---\n"
    parsed = ModelCard(card)
    if local is not None:
        setattr(parsed.data, LOCAL_KEY, local)
    elif LOCAL_KEY in parsed.data.to_dict():
        delattr(parsed.data, LOCAL_KEY)
    else:
        return card
    return str(parsed)


def local_base_of(card: str) -> str | None:
    """loramerge's reference to the base, from a model card's metadata (None where it has none)."""
    from huggingface_hub import ModelCard

    try:
        value = ModelCard(card).data.to_dict().get(LOCAL_KEY)
    except Exception:  # a card that is not valid YAML front matter names nothing
        return None
    return value if isinstance(value, str) else None
