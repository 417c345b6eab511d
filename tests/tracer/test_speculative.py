"""Speculative columns: the next MoE layer's router applied to this layer's output."""

from __future__ import annotations

import pytest
import torch

from moetrace.store import open_trace
from moetrace.tracer.recorder import RoutingRecorder

from .tiny_models import PAD, tiny_model

torch.set_num_threads(1)


def _next_router_topk(arch: str, block: torch.nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    if arch == "llama4":
        return block.router(x)[1].topk(k, dim=1).indices
    return [t for t in block.gate(x) if not t.is_floating_point()][-1]


@pytest.mark.parametrize("arch", ["qwen2_moe", "llama4", "deepseek_v3"])
def test_speculative_is_next_router_on_layer_output(arch: str, tmp_path) -> None:
    model = tiny_model(arch)
    layers = model.model.layers
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: outputs[i].append(o.detach()))
        for i, layer in enumerate(layers)
    ]
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        with RoutingRecorder(model, tmp_path / "t", speculative=True) as rec:
            rec.generate(["r"], ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    finally:
        for h in handles:
            h.remove()
    trace = open_trace(tmp_path / "t")
    assert trace.manifest.speculative
    moe = list(trace.manifest.model.moe_layers)
    k = trace.top_k
    acts = trace.read_activations().to_pandas()
    for this, nxt in zip(moe, moe[1:] + [None], strict=True):
        rows = acts[acts.layer == this].sort_values("token")
        spec = rows[[f"s{i}" for i in range(k)]]
        if nxt is None:
            assert spec.isna().all().all()
            continue
        block = getattr(layers[nxt], "mlp", None) or layers[nxt].feed_forward
        norm = layers[nxt].post_attention_layernorm
        expected = []
        with torch.no_grad():
            for hidden in outputs[this]:
                h = hidden.reshape(-1, hidden.shape[-1])
                expected += [sorted(r) for r in _next_router_topk(arch, block, norm(h), k).tolist()]
        got = [sorted(int(v) for v in r) for r in spec.itertuples(index=False)]
        assert got == expected
        assert len(got) == len(acts[acts.layer == nxt])
