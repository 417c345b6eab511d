"""The demo MoE model and prompt set shipped inside the package.

``moetrace record`` without ``--model`` traces this model: a small ``qwen3_moe`` trained by
``scripts/train_demo_model.py`` on the Python standard library's sources and documentation
(see docs/demo-model.md). It loads offline with the standard transformers Auto classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetrace.errors import ModelError, PromptsError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-moe"
DEMO_PROMPTS_FILE = ASSETS_DIR / "prompts" / "demo_prompts.jsonl"
DEMO_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_REBUILD_HINT = "rebuild it with: python scripts/train_demo_model.py --out moetrace/assets/demo-moe"


def demo_model_path() -> Path:
    """Directory of the shipped demo model (config, bf16 safetensors, tokenizer).

    Raises:
        ModelError: a file of the demo model is missing from the installed package.
    """
    missing = [name for name in DEMO_MODEL_FILES if not (DEMO_MODEL_DIR / name).is_file()]
    if missing:
        raise ModelError(
            f"demo model is incomplete: {', '.join(missing)} missing in {DEMO_MODEL_DIR}; "
            f"{_REBUILD_HINT}"
        )
    return DEMO_MODEL_DIR


def demo_prompts_path() -> Path:
    """The shipped prompt set (JSONL: ``id``, ``prompt``, ``tags.domain`` code|prose, ``tags.source``).

    Raises:
        PromptsError: the prompt file is missing from the installed package.
    """
    if not DEMO_PROMPTS_FILE.is_file():
        raise PromptsError(f"demo prompt set missing: {DEMO_PROMPTS_FILE}; {_REBUILD_HINT}")
    return DEMO_PROMPTS_FILE


def load_demo_model(
    dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> tuple[Any, Any]:
    """Load the demo model and its tokenizer, in eval mode.

    Args:
        dtype: weights dtype; ``None`` means float32 (the shipped bf16 weights upcast), which is
            the fast and exact choice on CPU.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a ``Qwen3MoeForCausalLM`` and a fast tokenizer.

    Raises:
        ModelError: the assets are missing or cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32 if dtype is None else dtype
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the demo model from {path}: {exc}") from exc
    model.to(device).eval()
    log.debug("loaded demo model from %s on %s", path, device)
    return model, tokenizer
