"""The files beside the weights: config, generation config, tokenizer and chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loramerge.errors import BadInput

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


def copy_side_files(source: Path, folder: Path) -> list[str]:
    """Copy tokenizer files and ``generation_config.json`` that exist in ``source``."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied


def resolve_chat_template(value: str) -> str:
    """A named template (``chatml``) or a Jinja template given inline."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    raise BadInput(f"chat_template: {value!r} is neither a known name ({', '.join(NAMED_TEMPLATES)}) nor Jinja")


def write_chat_template(folder: Path, template: str) -> None:
    (folder / "chat_template.jinja").write_text(template)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2) + "\n")
