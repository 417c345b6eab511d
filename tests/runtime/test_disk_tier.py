"""The disk tier: reads without the page cache, measured expert memory, the budget check,
no per-call copy of experts, and version 1 stores still read."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os

import pytest
import torch
from rt_models import assert_within_budget, clone, find_layers_info, layer_plan, tiny_model
from safetensors.torch import save_file

from moetrace.errors import RuntimeEngineError
from moetrace.runtime import OffloadEngine
from moetrace.runtime.direct_io import ExpertLayout, LayerFiles, write_layer_file
from moetrace.runtime.expert_store import (
    DENSE_FILE,
    STORE_INDEX,
    expert_file,
    layer_file,
    prepare_store,
    save_dense,
)
from moetrace.runtime.experts import find_moe_layers
from moetrace.runtime.memory import ALIGN, ExpertMemory

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_pages(path: os.PathLike[str]) -> int:
    """Pages of ``path`` in the page cache now (mincore on a mapping that reads nothing)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        assert _libc.mincore(addr, size, vec) == 0
        _libc.munmap(addr, size)
        return sum(b & 1 for b in vec.raw)
    finally:
        os.close(fd)


def _experts(layout: ExpertLayout, n: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    size = torch.empty((), dtype=dtype).element_size()
    return [
        {nm: torch.randn(nb // size, generator=g).to(dtype) for nm, nb in zip(layout.names, layout.nbytes, strict=True)}
        for _ in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("nbytes", "mode"),
    [((8192, 4096), "direct"), ((8192, 4096), "dontneed"), ((1000 * 4, 24), "dontneed")],
)
def test_layer_file_reads_are_exact_and_leave_no_page_cache(tmp_path, nbytes, mode):
    layout = ExpertLayout.of(("a", "b"), nbytes)
    experts = _experts(layout, 6)
    path = tmp_path / "L0001.bin"
    write_layer_file(path, layout, experts)
    assert path.stat().st_size == 6 * layout.stride
    files = LayerFiles([path], layout, mode)
    if mode == "direct" and files.mode != "direct":
        pytest.skip("this file system has no O_DIRECT")
    assert files.mode == mode
    mem = ExpertMemory(torch.device("cpu"))
    out = {
        nm: mem.allocate(nb, nm).view(torch.float32)
        for nm, nb in zip(layout.names, nbytes, strict=True)
    }
    for e in (3, 0, 5):
        assert files.read_into(0, e, out) == sum(nbytes)
        for nm in layout.names:
            assert torch.equal(out[nm], experts[e][nm])
    files.close()
    assert cached_pages(path) == 0
    path.read_bytes()  # a plain read does fill the cache: the check above can fail
    assert cached_pages(path) > 0


def test_truncated_layer_file_is_a_clear_error(tmp_path):
    layout = ExpertLayout.of(("a",), (8192,))
    path = tmp_path / "L0001.bin"
    write_layer_file(path, layout, _experts(layout, 2))
    os.truncate(path, 8192 + 100)
    files = LayerFiles([path], layout, "dontneed")
    buf = ExpertMemory(torch.device("cpu")).allocate(8192, "a").view(torch.float32)
    with pytest.raises(RuntimeEngineError, match="expert 1 is truncated"):
        files.read_into(0, 1, {"a": buf})
    files.close()
    with pytest.raises(RuntimeEngineError, match="cannot open expert file"):
        LayerFiles([tmp_path / "missing.bin"], layout)


def test_memory_ledger_measures_allocations_and_fails_over_budget():
    mem = ExpertMemory(torch.device("cpu"), limit=3 * ALIGN + 2 * ALIGN)
    a = mem.allocate(3 * ALIGN, "slots")
    assert a.data_ptr() % ALIGN == 0 and a.numel() == 3 * ALIGN
    assert mem.buffers["slots"] == a.untyped_storage().nbytes() >= 3 * ALIGN
    with pytest.raises(RuntimeEngineError, match="over the budget"):
        mem.allocate(2 * ALIGN, "more")
    mem.release("more")
    mem.release("slots")
    assert mem.current == 0 and mem.peak > 3 * ALIGN


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_budget_check_fails_when_expert_memory_exceeds_it(prompt_ids, implementation):
    model = tiny_model("qwen3_moe", implementation)
    bpe = find_layers_info(model).bytes_per_expert
    with OffloadEngine.from_model(model, budget_bytes=(4 + 2) * bpe) as eng:
        model.generate(prompt_ids, max_new_tokens=2, do_sample=False)
        assert_within_budget(eng, (4 + 2) * bpe)
        with pytest.raises(RuntimeEngineError, match="over the budget"):
            eng.memory.track("stray", bpe)  # a buffer the budget does not cover
        eng.memory.release("stray")
        eng.memory.limit = eng.memory.current - 1  # a budget the slots exceed
        with pytest.raises(RuntimeEngineError, match="over the budget"):
            model.generate(prompt_ids, max_new_tokens=1, do_sample=False)


def _largest_allocation(model, ids) -> int:
    """The largest single allocation of a short greedy generation from ``ids``."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        model.generate(ids, max_new_tokens=2, do_sample=False)
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_no_copy_of_experts_per_call(prompt_ids, implementation):
    """A decode step under the engine allocates nothing larger than the plain model's
    step does (the old engine gathered the needed experts into a new tensor per call,
    larger than an expert tensor: that fails this for eager and grouped_mm)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.set_experts_implementation(implementation)
    smallest = min(p.nbytes for p in find_moe_layers(model)[0].params)
    ids = prompt_ids[:, :4]
    plain = _largest_allocation(model, ids)
    with OffloadEngine.from_model(model, None) as eng:
        engine = _largest_allocation(model, ids)
        assert eng.stats.summary()["hits"] > 0
    assert engine <= plain, (engine, plain)
    if implementation != "batched_mm":  # batched_mm gathers per pair itself
        assert engine < smallest, (engine, smallest)


def _write_v1_store(model_dir, out):
    """A version 1 store (one safetensors file per expert), as moetrace wrote before."""
    from transformers import AutoModelForCausalLM

    from moetrace.runtime.expert_store import StoreIndex, detach_experts, model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = find_moe_layers(model)
    fp = model_fingerprint(model)
    (out / "experts").mkdir(parents=True)
    tensors = detach_experts(model, layers)
    for ref, ts in zip(layers, tensors, strict=True):
        for e in range(ref.num_experts):
            save_file(
                {n: t[e].contiguous() for n, t in ts.items()},
                str(out / expert_file(ref.layer_id, e)),
            )
    save_dense(model, out / DENSE_FILE)
    model.config.save_pretrained(out)
    index = StoreIndex(
        tuple(r.layer_id for r in layers), layers[0].num_experts, layers[0].top_k,
        layers[0].params, fp, "float32", 1,
    )  # fmt: skip
    data = index.to_json()
    data["format_version"] = 1
    del data["layout"]
    (out / STORE_INDEX).write_text(json.dumps(data))


def test_v1_store_still_runs_and_v2_reads_bypass_the_cache(tmp_path, prompt_ids):
    model = tiny_model("olmoe")
    ref = model.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    model_dir = tmp_path / "model"
    clone(model).save_pretrained(model_dir)
    _write_v1_store(model_dir, tmp_path / "v1")
    prepare_store(model_dir, tmp_path / "v2")
    bpe = find_layers_info(model).bytes_per_expert
    for store in ("v1", "v2"):
        with OffloadEngine.from_store(str(tmp_path / store), budget_bytes=(4 + 3) * bpe) as eng:
            out = eng.model.generate(prompt_ids, max_new_tokens=5, do_sample=False)
            assert eng.stats.summary()["misses"] > 0
            assert_within_budget(eng, (4 + 3) * bpe)
            assert eng.pool.source.mode == ("mmap" if store == "v1" else eng.pool.source.files.mode)
        assert torch.equal(out, ref), store
    for layer_id in (0, 1, 2):
        assert cached_pages(tmp_path / "v2" / layer_file(layer_id)) == 0


def test_bad_store_version_is_a_clear_error(tmp_path, prompt_ids):
    model_dir = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(model_dir)
    prepare_store(model_dir, tmp_path / "s")
    idx = tmp_path / "s" / STORE_INDEX
    data = json.loads(idx.read_text())
    data["format_version"] = 9
    idx.write_text(json.dumps(data))
    with pytest.raises(RuntimeEngineError, match="version 9"):
        OffloadEngine.from_store(str(tmp_path / "s"))


def test_disk_prefetch_reads_in_the_background(tmp_path, prompt_ids):
    """Speculative prefetch from a v2 store: reads queued on the I/O thread (demand loads
    behind them), outputs identical, prefetched experts used."""
    from moetrace.store.plan import PrefetchConfig

    model = tiny_model("olmoe")
    ref = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
    model.save_pretrained(tmp_path / "model")
    prepare_store(tmp_path / "model", tmp_path / "s")
    info = find_layers_info(model)
    plan = layer_plan(info, (5, 5, 5), prefetch=PrefetchConfig("speculative", fetch=3))
    with OffloadEngine.from_store(str(tmp_path / "s"), plan) as eng:
        assert eng.pool._queued and eng.pool._io is not None
        out = eng.model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
        s = eng.stats.summary()
        assert_within_budget(eng, (15 + 3) * info.bytes_per_expert)
    assert torch.equal(out, ref)
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0 and s["bytes_prefetch"] > 0
