"""Phase detection does not depend on the name the KV cache is passed under."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from moetrace.tracer.phase import DECODE, PREFILL, cached_tokens, forward_phase

from .tiny_models import tiny_model


def _filled_cache(tokens: int) -> DynamicCache:
    model = tiny_model("olmoe")
    ids = torch.randint(4, 20, (1, tokens))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert cache.get_seq_length() == tokens
    return cache


@pytest.fixture(scope="module")
def cache5() -> DynamicCache:
    return _filled_cache(5)


@pytest.mark.parametrize("name", ["past_key_values", "cache", "kv", "whatever_it_is_called"])
def test_cache_found_under_any_keyword(cache5, name):
    assert cached_tokens((), {name: cache5, "input_ids": torch.zeros(1, 1)}) == 5
    assert forward_phase((), {name: cache5}) == DECODE


def test_cache_found_positionally(cache5):
    assert cached_tokens((torch.zeros(1, 1), None, None, cache5), {}) == 5


def test_empty_cache_is_prefill():
    empty = DynamicCache()
    assert cached_tokens((), {"cache": empty}) == 0
    assert forward_phase((), {"cache": empty}) == PREFILL


def test_cache_position_and_legacy_tuples():
    assert cached_tokens((), {"cache_position": torch.tensor([7, 8])}) == 7
    legacy = ((torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4)),)
    assert cached_tokens((), {"past_key_values": legacy}) == 9


def test_no_cache_is_prefill():
    assert cached_tokens((torch.zeros(1, 3),), {"use_cache": False}) is None
    assert forward_phase((), {"input_ids": torch.zeros(1, 3)}) == PREFILL


def test_generate_passes_a_cache_the_hook_finds():
    """Whatever this transformers version calls it, decode steps see a non-empty cache."""
    model = tiny_model("olmoe")
    phases: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: phases.append(forward_phase(a, k)), with_kwargs=True
    )
    try:
        ids = torch.randint(4, 20, (1, 4))
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    finally:
        handle.remove()
    assert phases == [PREFILL, DECODE, DECODE, DECODE]
