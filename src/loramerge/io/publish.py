"""Publishing an output folder to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, the cached login); it is never
printed, logged or written into a card, and is scrubbed from any error message.
"""

from __future__ import annotations

from pathlib import Path

from loramerge.errors import brief
from loramerge.io.atomic import MARKER_NAME


class PushFailed(RuntimeError):
    """The output was written but could not be uploaded."""


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Upload with loramerge",
            ignore_patterns=[MARKER_NAME],  # local bookkeeping of `force`, not part of the model
        )  # fmt: skip
    except Exception as error:  # network, auth and validation errors all mean "not published"
        raise PushFailed(_scrub(f"could not push {folder} to the Hub repo {repo_id}: {brief(error)}")) from None
    return str(url)
