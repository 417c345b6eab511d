"""Fixtures: a tiny MoE model saved with a tokenizer built in code (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .tiny_models import BOS, EOS, PAD, VOCAB, tiny_model


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_model("olmoe").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_prompts(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(start, start + n):
            words = " ".join(f"w{4 + (i * 7 + j) % 80}" for j in range(2 + i % 4))
            fh.write(json.dumps({"id": f"q{i}", "prompt": words, "tags": {"domain": "d"}}) + "\n")
    return path
