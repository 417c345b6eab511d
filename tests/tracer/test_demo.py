"""The shipped demo MoE model and prompt set (moetrace/assets)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moetrace.errors import ModelError, PromptsError
from moetrace.tracer import demo
from moetrace.tracer.demo import demo_model_path, demo_prompts_path, load_demo_model

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def offline(monkeypatch_module: pytest.MonkeyPatch) -> None:
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def trained(offline: None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    return model, tok


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    lines = demo_prompts_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_paths_point_into_the_package() -> None:
    model_dir = demo_model_path()
    assert model_dir.is_dir()
    assert model_dir.parent.name == "assets"
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "generation_config.json").is_file()
    assert (model_dir / "training_report.json").is_file()
    assert demo_prompts_path().name == "demo_prompts.jsonl"


def test_missing_assets_raise_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path / "demo-moe")
    monkeypatch.setattr(demo, "DEMO_PROMPTS_FILE", tmp_path / "p.jsonl")
    with pytest.raises(ModelError, match=r"model\.safetensors.*demo-moe"):
        demo_model_path()
    with pytest.raises(ModelError):
        load_demo_model()
    with pytest.raises(PromptsError, match=r"p\.jsonl"):
        demo_prompts_path()


def test_shipped_files_fit_the_size_budget() -> None:
    files = [p for p in demo_model_path().rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert 1_000_000 < total <= MAX_BYTES, total
    names = {p.name for p in files}
    assert not {n for n in names if n.endswith((".bin", ".pt", ".py"))}  # safetensors, no code


def test_config_is_a_fine_grained_moe_as_documented() -> None:
    cfg = AutoConfig.from_pretrained(demo_model_path())
    assert cfg.model_type == "qwen3_moe"
    assert 32 <= cfg.num_experts <= 64
    assert 4 <= cfg.num_experts_per_tok <= 8
    assert 4 <= cfg.num_hidden_layers <= 8
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1  # every layer is MoE
    assert 4096 <= cfg.vocab_size <= 8192
    assert cfg.router_aux_loss_coef > 0
    report = json.loads((demo_model_path() / "training_report.json").read_text())
    arch = report["architecture"]
    assert arch["num_experts"] == cfg.num_experts
    assert arch["num_experts_per_tok"] == cfg.num_experts_per_tok
    assert arch["num_hidden_layers"] == cfg.num_hidden_layers
    doc = (REPO_ROOT / "docs" / "demo-model.md").read_text()
    assert f"{cfg.num_experts} experts" in doc
    assert f"top-{cfg.num_experts_per_tok}" in doc
    assert f"{cfg.num_hidden_layers} layers" in doc


def test_loads_offline_with_auto_classes_and_generates(trained) -> None:
    model, tok = trained
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert tok.eos_token_id == model.config.eos_token_id is not None
    assert tok.pad_token_id == model.config.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    gc = model.generation_config
    assert gc.eos_token_id == tok.eos_token_id and gc.pad_token_id == tok.pad_token_id
    text = "def main(argv):\n    return 0\n"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == text  # byte-level BPE round-trips code
    out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert torch.equal(out[0, : ids["input_ids"].shape[1]], ids["input_ids"][0])


def test_load_demo_model_convenience() -> None:
    model, tok = load_demo_model()
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    model16, _ = load_demo_model(dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    assert tok.eos_token == "<|endoftext|>"


def test_prompt_set_fields_domains_and_lengths(prompts: list[dict], trained) -> None:
    _, tok = trained
    assert 280 <= len(prompts) <= 400
    assert len({p["id"] for p in prompts}) == len(prompts)
    domains = [p["tags"]["domain"] for p in prompts]
    assert set(domains) == {"code", "prose"}
    assert domains.count("code") >= 140 and domains.count("prose") >= 140
    for p in prompts:
        assert set(p) == {"id", "prompt", "tags"} and set(p["tags"]) == {"domain", "source"}
        assert re.fullmatch(r"(code|prose)-\d{4}", p["id"]) and p["id"].startswith(
            p["tags"]["domain"]
        )
        n = len(tok(p["prompt"], add_special_tokens=False)["input_ids"])
        assert 20 <= n <= 60, (p["id"], n)
        # drawn from the held-out split of scripts/train_demo_model.py (crc32(name) % 10 == 0)
        assert zlib.crc32(p["tags"]["source"].encode()) % 10 == 0, p["tags"]["source"]


def _expert_counts(model, tok, texts: list[str]) -> np.ndarray:
    """(layers, experts) counts of top-k selections over all (unpadded) tokens of the texts."""
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts))
    enc = tok(texts, padding=True, return_tensors="pt")
    real = enc["attention_mask"].reshape(-1).bool()
    with torch.no_grad():
        out = model(**enc, output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        top = torch.topk(logits[real], cfg.num_experts_per_tok, dim=-1).indices
        counts[layer] += np.bincount(top.ravel().numpy(), minlength=cfg.num_experts)
    return counts


def _js(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))  # noqa: E731
    return (kl(p) + kl(q)) / 2


def test_routing_specialises_code_vs_prose(trained, prompts: list[dict]) -> None:
    """Code and prose prompts go to clearly different experts, unlike in a random-init copy.

    The whole prompt set is used (about 6k tokens per domain): on a handful of short prompts
    the random-init divergence is dominated by sampling noise of the few distinct tokens.
    """
    model, tok = trained
    code = [p["prompt"] for p in prompts if p["tags"]["domain"] == "code"]
    prose = [p["prompt"] for p in prompts if p["tags"]["domain"] == "prose"]
    torch.manual_seed(0)
    random_init = type(model)(model.config).eval()

    def per_layer_js(m) -> np.ndarray:
        c, p = _expert_counts(m, tok, code), _expert_counts(m, tok, prose)
        return np.array([_js(c[i], p[i]) for i in range(len(c))])

    js_trained, js_random = per_layer_js(model), per_layer_js(random_init)
    assert js_trained.mean() > 2 * js_random.mean(), (js_trained, js_random)
    assert js_trained.mean() > js_random.mean() + 0.05, (js_trained, js_random)
    assert js_trained.max() > 0.15, js_trained  # at least one strongly specialised layer
