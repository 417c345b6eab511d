#!/usr/bin/env python
"""Train the small MoE model that ships with moetrace (``moetrace/assets/demo-moe``).

Everything it learns from is already on any machine with Python: the standard library's
sources (code) and its documentation text (prose: ``pydoc_data.topics`` plus docstrings
extracted with ``ast``). Modules and pydoc topics are split into train / held-out by a
stable hash of their name; the held-out part feeds the evaluation and the demo prompt set.

Steps: build the corpus, train a byte-level BPE tokenizer (``tokenizers``), train a
``qwen3_moe`` model (standard transformers architecture, experts through the
``transformers.integrations.moe`` interface) with the architecture's load-balancing aux loss,
save it in bf16 safetensors, then measure routing of the trained model against a random-init
copy of the same architecture on held-out code and prose: per-layer expert-frequency Gini,
co-activation concentration (share of pair mass in the top 10% of expert pairs) and the
Jensen-Shannon divergence between the code and prose expert distributions. The evidence is
printed and written to ``training_report.json`` next to the model; the prompt set is written
to ``moetrace/assets/prompts/demo_prompts.jsonl`` (``--prompts-out``).

Usage::

    python scripts/train_demo_model.py --out moetrace/assets/demo-moe

About 17 minutes with the defaults on a busy 2-core CPU box (one thread); fully seeded.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import logging
import math
import platform
import random
import sysconfig
import textwrap
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

log = logging.getLogger("train_demo_model")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
HELD_OUT_BUCKETS = 10  # 1 bucket in 10 is held out
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SKIP_FILES = {"pydoc_data/topics.py"}  # prose stored as a Python literal; used as prose instead


@dataclass(frozen=True)
class Doc:
    """One unit of text: a module's source, a docstring, or a pydoc topic."""

    domain: str  # "code" | "prose"
    source: str  # module name or "pydoc:<topic>"
    text: str
    held_out: bool


def is_held_out(name: str) -> bool:
    """Stable (PYTHONHASHSEED-independent) split by name."""
    return zlib.crc32(name.encode()) % HELD_OUT_BUCKETS == 0


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_corpus(min_doc_chars: int = 120) -> list[Doc]:
    """Standard-library sources as code, docstrings and pydoc topics as prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Doc] = []
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    for path in files:
        rel = path.relative_to(root)
        if rel.as_posix() in SKIP_FILES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        name = module_name(rel)
        held = is_held_out(name)
        docs.append(Doc("code", name, text, held))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_doc_chars:
                    docs.append(Doc("prose", name, doc, held))
    from pydoc_data.topics import topics

    for key in sorted(topics):
        docs.append(Doc("prose", f"pydoc:{key}", topics[key], is_held_out(f"pydoc:{key}")))
    return docs


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[Doc], vocab_size: int, max_chars: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on an equal-sized sample of training code and prose."""
    per_domain = max_chars // 2
    texts: list[str] = []
    for domain in ("code", "prose"):
        used = 0
        for d in docs:
            if d.domain == domain and not d.held_out and used < per_domain:
                texts.append(d.text)
                used += len(d.text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tok: PreTrainedTokenizerFast, docs: list[Doc], max_tokens: int) -> np.ndarray:
    """Concatenate documents (each followed by EOS) into one int32 array."""
    ids: list[int] = []
    eos = tok.eos_token_id
    batch = 64
    for i in range(0, len(docs), batch):
        enc = tok([d.text for d in docs[i : i + batch]], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int32)


# ---------------------------------------------------------------------------- model


def build_config(args: argparse.Namespace, tok: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,  # unused: every layer is MoE
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 64),
        head_dim=32,
        moe_intermediate_size=args.expert_hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def new_model(config: Qwen3MoeConfig, seed: int) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    try:  # fastest CPU path; the default is kept if this transformers lacks it
        model.set_experts_implementation("grouped_mm")
    except (ValueError, AttributeError) as exc:  # pragma: no cover - version dependent
        log.warning("grouped_mm experts unavailable (%s); using the default", exc)
    return model


def sample_batch(streams: dict[str, np.ndarray], rng: np.random.Generator, batch: int, seq: int):
    """Half code windows, half prose windows."""
    rows = []
    for i in range(batch):
        s = streams["code" if i % 2 == 0 else "prose"]
        start = int(rng.integers(0, len(s) - seq - 1))
        rows.append(s[start : start + seq])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def train(model, streams, args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    history = []
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = sample_batch(streams, rng, args.batch_size, args.seq_len)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = out.loss.item() - args.aux_coef * out.aux_loss.item()
        bar.set_postfix(lm=f"{lm:.3f}", aux=f"{out.aux_loss.item():.3f}", refresh=False)
        if step % args.log_every == 0 or step == args.steps - 1:
            rec = {
                "step": step,
                "lm_loss": lm,
                "aux_loss": out.aux_loss.item(),
                "s": time.time() - t0,
            }
            history.append(rec)
            log.info(
                "step %d lm_loss %.3f aux_loss %.3f (%.0fs)", step, lm, rec["aux_loss"], rec["s"]
            )
    model.eval()
    return history


# ---------------------------------------------------------------------------- routing evidence


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = uniform)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if x.sum() == 0:
        return 0.0
    cum = np.cumsum(x)
    return float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0..1) between two count vectors."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def routed_experts(model, windows: torch.Tensor, batch: int = 16) -> np.ndarray:
    """Top-k expert ids, shape (layers, tokens, k), for each token of the windows."""
    k = model.config.num_experts_per_tok
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_hidden_layers)]
    for i in range(0, len(windows), batch):
        out = model(input_ids=windows[i : i + batch], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            per_layer[layer].append(torch.topk(logits.float(), k, dim=-1).indices.numpy())
    return np.stack([np.concatenate(chunks) for chunks in per_layer])


def routing_stats(code: np.ndarray, prose: np.ndarray, num_experts: int) -> dict:
    """Per-layer skew, co-activation concentration and code-vs-prose divergence."""
    layers = []
    pairs_idx = np.triu_indices(num_experts, 1)
    top_pairs = max(1, round(0.1 * len(pairs_idx[0])))
    for layer in range(code.shape[0]):
        c = np.bincount(code[layer].ravel(), minlength=num_experts)
        p = np.bincount(prose[layer].ravel(), minlength=num_experts)
        both = np.concatenate([code[layer], prose[layer]])
        co = np.zeros((num_experts, num_experts))
        for a, b in itertools.combinations(range(both.shape[1]), 2):
            np.add.at(co, (both[:, a], both[:, b]), 1)
        co = co + co.T
        pair_mass = np.sort(co[pairs_idx])[::-1]
        layers.append(
            {
                "layer": layer,
                "gini_all": gini(c + p),
                "gini_code": gini(c),
                "gini_prose": gini(p),
                "coact_top10pct_share": float(pair_mass[:top_pairs].sum() / pair_mass.sum()),
                "js_code_vs_prose": js_divergence(c.astype(float) + 1e-12, p.astype(float) + 1e-12),
            }
        )
    keys = [k for k in layers[0] if k != "layer"]
    mean = {k: float(np.mean([row[k] for row in layers])) for k in keys}
    return {"per_layer": layers, "mean": mean}


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    losses = []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        losses.append(model(input_ids=x, labels=x).loss.item())
    return float(np.mean(losses))


def eval_windows(stream: np.ndarray, n: int, seq: int) -> torch.Tensor:
    step = max(seq, (len(stream) - seq) // n)
    starts = [i * step for i in range(n) if i * step + seq <= len(stream)]
    return torch.from_numpy(np.stack([stream[s : s + seq] for s in starts]).astype(np.int64))


# ---------------------------------------------------------------------------- prompts


def _prompt_units(doc: Doc) -> tuple[list[str], list[int], str]:
    """Units to join (lines or sentences), candidate start positions, and the joiner."""
    if doc.domain == "code":
        lines = doc.text.splitlines()
        heads = ("def ", "class ", "for ", "if ", "return ", "with ", "while ", "try:", "import ")
        starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(heads)]
        return lines, starts, "\n"
    flat = " ".join(doc.text.split())
    sentences = [u.strip() for u in flat.split(". ") if len(u.strip()) > 1]
    sentences = [u if u.endswith((".", ":", "?", "!")) else u + "." for u in sentences]
    return sentences, list(range(len(sentences))), " "


def make_prompts(
    docs: list[Doc], tok: PreTrainedTokenizerFast, per_domain: int, seed: int
) -> list[dict]:
    """Short (20-60 token) prompts cut on line / sentence boundaries from held-out text."""
    rng = random.Random(seed)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    out: list[dict] = []
    for domain, cap in (("code", 5), ("prose", 4)):
        held = [d for d in docs if d.held_out and d.domain == domain]
        rng.shuffle(held)
        per_source: dict[str, int] = {}
        found: list[tuple[str, str]] = []
        for d in held:
            units, starts, joiner = _prompt_units(d)
            rng.shuffle(starts)
            used: set[int] = set()
            for s in starts[:40]:
                if per_source.get(d.source, 0) >= cap or len(found) >= per_domain:
                    break
                if s in used:
                    continue
                text, last = "", s
                for j in range(s, len(units)):
                    cand = (text + joiner + units[j]) if text else units[j]
                    if n_tokens(textwrap.dedent(cand)) > 60:
                        break
                    text, last = cand, j
                text = textwrap.dedent(text).strip("\n")
                if text.strip() and 20 <= n_tokens(text) <= 60:
                    found.append((text, d.source))
                    used.update(range(s, last + 1))
                    per_source[d.source] = per_source.get(d.source, 0) + 1
        if len(found) < per_domain:
            log.warning("only %d %s prompts from held-out text", len(found), domain)
        for i, (text, source) in enumerate(found):
            out.append(
                {
                    "id": f"{domain}-{i:04d}",
                    "prompt": text,
                    "tags": {"domain": domain, "source": source},
                }
            )
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("moetrace/assets/demo-moe"))
    ap.add_argument(
        "--prompts-out", type=Path, default=Path("moetrace/assets/prompts/demo_prompts.jsonl")
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer-chars", type=int, default=6_000_000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-hidden", type=int, default=64)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-windows", type=int, default=48, help="held-out windows per domain")
    ap.add_argument("--prompts-per-domain", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    docs = collect_corpus()
    counts = {
        f"{dom}_{split}": sum(
            len(d.text) for d in docs if d.domain == dom and d.held_out == (split == "heldout")
        )
        for dom in ("code", "prose")
        for split in ("train", "heldout")
    }
    log.info("corpus chars: %s", counts)

    tok = train_tokenizer(docs, args.vocab_size, args.tokenizer_chars)
    log.info("tokenizer: %d tokens", len(tok))

    rng = random.Random(args.seed)
    by = {}
    for dom in ("code", "prose"):
        for held in (False, True):
            sel = [d for d in docs if d.domain == dom and d.held_out == held]
            rng.shuffle(sel)
            by[(dom, held)] = sel
    train_tokens = args.steps * args.batch_size * args.seq_len  # upper bound per domain needed
    streams = {dom: token_stream(tok, by[(dom, False)], train_tokens) for dom in ("code", "prose")}
    held = {dom: token_stream(tok, by[(dom, True)], 10**9) for dom in ("code", "prose")}
    log.info(
        "tokens: train code %d prose %d, held-out code %d prose %d",
        len(streams["code"]),
        len(streams["prose"]),
        len(held["code"]),
        len(held["prose"]),
    )

    config = build_config(args, tok)
    model = new_model(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: qwen3_moe, %d params", n_params)
    history = train(model, streams, args)

    # ---- save (bf16 weights), tokenizer, generation config
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        repetition_penalty=1.1,
        max_new_tokens=48,
    )
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save_pretrained(args.out)

    # ---- evidence: reload what was saved (bf16 -> fp32) vs a random-init copy
    trained = transformers.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    trained.eval()
    random_init = new_model(config, args.seed + 1).eval()
    win = {d: eval_windows(held[d], args.eval_windows, args.seq_len) for d in ("code", "prose")}
    E = config.num_experts
    report_models = {}
    for name, m in (("trained", trained), ("random_init", random_init)):
        stats = routing_stats(routed_experts(m, win["code"]), routed_experts(m, win["prose"]), E)
        stats["heldout_loss"] = {d: heldout_loss(m, win[d]) for d in ("code", "prose")}
        report_models[name] = stats

    samples = []
    gen_tok = transformers.AutoTokenizer.from_pretrained(args.out)
    torch.manual_seed(args.seed)
    for prompt in (
        "def __init__(self, ",
        "import os\n\n\ndef ",
        "The default value of the ",
        "This module provides ",
    ):
        ids = gen_tok(prompt, return_tensors="pt")
        gen = trained.generate(**ids, max_new_tokens=40)
        samples.append(gen_tok.decode(gen[0], skip_special_tokens=True))

    prompts = make_prompts(docs, tok, args.prompts_per_domain, args.seed)
    args.prompts_out.parent.mkdir(parents=True, exist_ok=True)
    with args.prompts_out.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")

    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    report = {
        "script": "scripts/train_demo_model.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "architecture": {
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "hidden_size": config.hidden_size,
            "moe_intermediate_size": config.moe_intermediate_size,
            "vocab_size": config.vocab_size,
            "parameters": n_params,
            "router_aux_loss_coef": config.router_aux_loss_coef,
        },
        "corpus_chars": counts,
        "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
        "eval": {
            "windows_per_domain": {d: int(len(w)) for d, w in win.items()},
            "tokens_per_domain": {d: int(w.numel()) for d, w in win.items()},
            "random_init_seed": args.seed + 1,
            **report_models,
        },
        "history": history,
        "samples": samples,
        "prompts": {
            "count": len(prompts),
            "by_domain": {
                d: sum(p["tags"]["domain"] == d for p in prompts) for d in ("code", "prose")
            },
        },
        "files_bytes_before_report": size,
        "wall_seconds": time.time() - t_start,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")

    # ---- print the evidence
    print(f"\nrouting on held-out text ({report['eval']['tokens_per_domain']} tokens)")
    print(
        f"{'layer':>5} | {'gini trained':>12} {'random':>7} | {'coact top10% tr':>15} {'random':>7}"
        f" | {'JS code/prose tr':>16} {'random':>7}"
    )
    for tr, rd in zip(
        report_models["trained"]["per_layer"],
        report_models["random_init"]["per_layer"],
        strict=True,
    ):
        print(
            f"{tr['layer']:>5} | {tr['gini_all']:>12.3f} {rd['gini_all']:>7.3f} |"
            f" {tr['coact_top10pct_share']:>15.3f} {rd['coact_top10pct_share']:>7.3f} |"
            f" {tr['js_code_vs_prose']:>16.3f} {rd['js_code_vs_prose']:>7.3f}"
        )
    for name in ("trained", "random_init"):
        print(
            f"{name:>12}: mean {json.dumps({k: round(v, 3) for k, v in report_models[name]['mean'].items()})}"
            f" held-out loss {report_models[name]['heldout_loss']}"
        )
    print("\nsamples:")
    for s in samples:
        print("---\n" + s)
    print(f"\nwrote {args.out} ({size / 1e6:.1f} MB), {len(prompts)} prompts -> {args.prompts_out}")


if __name__ == "__main__":
    main()
