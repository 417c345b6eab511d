"""Expert store (disk tier) and the runtime CLI commands."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from rt_models import find_layers_info, layer_plan, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from moetrace.cli import main
from moetrace.runtime import OffloadEngine, prepare_store
from moetrace.runtime.expert_store import DENSE_FILE, layer_file
from moetrace.runtime.memory import ALIGN
from moetrace.store.plan import Budget, CacheLayout, EvictionConfig, Plan, RoutingShape, save_plan


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    model = tiny_model("qwen3_moe")
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="w0"
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    prepare_store(model_dir, out)
    return out


def test_store_layout_and_disk_run_identical(model_dir, store_dir, prompt_ids):
    assert (store_dir / DENSE_FILE).is_file()
    assert (store_dir / layer_file(2)).is_file()
    dense_bytes = (store_dir / DENSE_FILE).stat().st_size
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = base.generate(prompt_ids, max_new_tokens=6, do_sample=False)
    layers_info = find_layers_info(base)
    bpe = layers_info.bytes_per_expert
    with OffloadEngine.from_store(str(store_dir), budget_bytes=(3 + 2) * bpe) as eng:
        assert eng.pool.source.tier == "disk"
        assert not any(p.shape[0] == 8 and p.dim() == 3 for p in eng.model.parameters())
        out = eng.model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
        assert eng.stats.total("bytes_demand") >= eng.stats.total("misses") * bpe
    assert torch.equal(out, ref)
    # the experts (8 per layer x 3 layers) live on disk, not in the dense file
    assert dense_bytes < 24 * bpe


def test_cli_run_with_plan_and_stats(model_dir, store_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    info = find_layers_info(base)
    plan_path = save_plan(layer_plan(info, (2, 2, 2)), tmp_path / "plan.json")
    stats = tmp_path / "stats.json"
    runner = CliRunner()
    for model in (str(model_dir), str(store_dir)):
        res = runner.invoke(
            main,
            ["run", "--model", model, "--plan", str(plan_path), "--prompt", "w1 w2 w3 w4",
             "--max-new-tokens", "4", "--stats-json", str(stats)],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads(stats.read_text())
        assert data["tokens"]["prefill"] == 4 and data["tokens"]["decode"] == 3
        mem = data["expert_memory"]
        assert 6 * info.bytes_per_expert <= mem["peak_bytes"] <= mem["limit_bytes"]
        assert mem["limit_bytes"] <= (6 + 2) * info.bytes_per_expert + ALIGN * 3
    res = runner.invoke(
        main,
        ["run", "--model", str(model_dir), "--plan", str(plan_path), "--prompt", "w1",
         "--budget", "1KiB"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "moetrace: error: budget '1KiB' is too small: 1024 bytes" in res.output


def test_cli_bad_plan_file(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = CliRunner().invoke(
        main, ["run", "--model", str(model_dir), "--plan", str(bad), "--prompt", "w1"]
    )
    assert res.exit_code == 2
    assert "bad.json: not valid JSON" in res.output


def test_cli_prepare_refuses_nonempty(model_dir, store_dir):
    res = CliRunner().invoke(main, ["prepare", str(model_dir), "--out", str(store_dir)])
    assert res.exit_code == 2 and "not empty" in res.output


def test_cli_bench_and_profile(model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    info = find_layers_info(base)
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=4, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("pool", (0, 0, 0), pool_slots=4),
        eviction=EvictionConfig("fifo"),
    )
    plan_path = save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(
        main,
        ["bench", "--model", str(model_dir), "--plan", str(plan_path), "--prompt", "w1 w2",
         "--repeats", "2", "--max-new-tokens", "3", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["raw"]) == {"plan", "all_resident", "lru"}
    assert all(len(v) == 2 and min(v) > 0 for v in data["raw"].values())
    assert data["hit_rate"]["all_resident"] >= data["hit_rate"]["lru"]
    prof = tmp_path / "hw.json"
    res = CliRunner().invoke(
        main,
        ["profile", "--model", str(model_dir), "--bytes", "1MiB", "--repeats", "2",
         "--out", str(prof)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    from moetrace.store.hardware import load_hardware

    hw = load_hardware(prof)
    assert hw.link_bandwidth_gbps > 0 and hw.layer_compute_base_us >= 0
