"""The dashboard's defects of issue 17 outside the Plans page: colour scales ruled by
outliers (expert heatmap, lift, rare transitions), "Colour by" tags that cannot colour,
tiles that cut long values. Each test checks the figure shown (AppTest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from moetrace.dashboard.inputs import ENV_VAR
from moetrace.dashboard.launch import APP
from moetrace.store import Manifest, ModelInfo, RequestRecord, SourceInfo, TraceWriter

LONG_NAME = "meta-llama/Llama-4-Maverick-17B-128E-Instruct-with-a-very-long-fine-tune-suffix"
E, K, LAYERS = 16, 2, (0, 1)


@pytest.fixture(scope="module")
def outlier_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 0: expert 0 in every token (half the activations), the rest spread; a rare pair (14, 15) seen twice
    (huge lift, tiny support); layer 1 follows layer 0 shifted by one, expert 0 spread
    over 1..12, and expert 13 is picked at layer 0 by one token only."""
    path = tmp_path_factory.mktemp("outliers") / "trace"
    rng = np.random.default_rng(0)
    model = ModelInfo(LONG_NAME, 2, LAYERS, E, K, bytes_per_expert=1 << 20)
    m = Manifest(model, source=SourceInfo(kind="synthetic"), gate_weights=False)
    with TraceWriter(path, m, threads=0) as w:
        for r in range(120):
            n = 20
            l0 = np.zeros((n, K), np.int16)
            l0[:, 1] = rng.integers(1, 13, n)
            if r < 2:
                l0[0] = (14, 15)  # the rare pair
            if r == 2:
                l0[0] = (13, 1)  # one token: its transition row would read 100%
            l1 = (l0 + 1) % E
            spread = (l0[:, 1] + 5) % 12 + 1  # never equal to l1[:, 1] = l0[:, 1] + 1
            l1[:, 0] = np.where(l0[:, 0] == 0, spread, l1[:, 0])  # no hot expert at layer 1
            exp = np.stack([l0, l1], axis=1).reshape(-1, K)
            tags = {"id": f"r{r}", "const": "same", "topic": ("a", "b", "c")[r % 3]}
            w.write_request(
                RequestRecord(f"r{r}", prompt_tokens=n, generated_tokens=0, tags=tags),
                token=np.repeat(np.arange(n), 2),
                step=0,
                phase=0,
                forward=r,
                layer=np.tile(np.array(LAYERS), n),
                experts=exp,
            )
    return path


def _open(monkeypatch: pytest.MonkeyPatch, trace: Path, page: str, **widgets: Any) -> AppTest:
    monkeypatch.setenv(ENV_VAR, json.dumps({"traces": [str(trace)]}))
    at = AppTest.from_file(str(APP), default_timeout=120)
    if page != "overview":
        at.switch_page(f"views/{page}.py")
    at.run()
    for key, value in widgets.items():
        at = _set(at, key, value)
    assert not at.exception, [e.value for e in at.exception]
    return at


def _set(at: AppTest, key: str, value: Any) -> AppTest:
    for kind in ("radio", "selectbox"):
        found = [w for w in at.get(kind) if w.key == key]
        if found:
            found[0].set_value(value)
            return at.run()
    raise AssertionError(f"no widget {key}")


def _charts(at: AppTest) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    out = []
    for c in at.get("vega_lite_chart"):
        frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in c.proto.datasets]
        out.append((json.loads(c.proto.spec), pd.concat(frames) if frames else pd.DataFrame()))
    return out


def _color_scale(spec: dict[str, Any]) -> dict[str, Any]:
    todo = [spec]
    while todo:
        s = todo.pop()
        color = s.get("encoding", {}).get("color")
        if isinstance(color, dict) and "scale" in color:
            return color["scale"]
        todo.extend(s.get("layer", []))
    raise AssertionError("no colour scale")


def test_expert_heatmap_is_not_washed_out_by_one_expert(monkeypatch, outlier_trace) -> None:
    at = _open(monkeypatch, outlier_trace, "experts")
    spec, data = _charts(at)[0]
    top = _color_scale(spec)["domain"][1]
    assert data["value"].max() > 45  # expert 0 is in every token: half of layer 0 ...
    assert top < 10  # ... yet the colours span the other experts' shares
    assert any("Colours saturate at" in c.value for c in at.caption)
    at = _set(at, "experts_scale", "linear")  # the old default: one cell rules the scale
    assert "domain" not in _color_scale(_charts(at)[0][0])


def test_lift_is_diverging_and_hides_pairs_without_support(monkeypatch, outlier_trace) -> None:
    at = _open(monkeypatch, outlier_trace, "groups", groups_measure="lift over independence")
    spec, data = _charts(at)[0]
    scale = _color_scale(spec)
    assert scale["scheme"] == "redblue" and scale["domain"][0] == -scale["domain"][1]
    rare = data[(data.y == 14) & (data.x == 15)].iloc[0]
    assert rare["support"] == 2 and pd.isna(rare["value"])  # grey, not a lift of ~100
    shown = data.dropna(subset=["value"])
    assert (shown["support"] >= 1).all() and len(shown) > 0
    assert any("grey" in c.value for c in at.caption)


def test_transitions_from_rare_experts_are_grey_with_their_support(
    monkeypatch, outlier_trace
) -> None:
    at = _open(monkeypatch, outlier_trace, "groups")
    spec, data = _charts(at)[1]
    row13 = data[data.y == 13]
    assert (row13["support"] == 1).all() and row13["value"].isna().all()  # was 100%
    row0 = data[data.y == 0]
    assert row0["value"].notna().all() and (row0["support"] > 1000).all()
    assert any("fewer than 20 tokens" in c.value for c in at.caption)


def test_colour_by_offers_only_tags_that_can_colour(monkeypatch, outlier_trace) -> None:
    from moetrace.dashboard.data.requests import colour_tags

    good, skipped = colour_tags(
        [{"id": f"r{i}", "const": "x", "t": "ab"[i % 2]} for i in range(50)]
    )
    assert good == ["t"] and set(skipped) == {"id", "const"}
    assert "50 values" in skipped["id"] and "same for every" in skipped["const"]
    at = _open(monkeypatch, outlier_trace, "requests")
    options = next(s for s in at.selectbox if s.key == "projection_colour").options
    assert "tag topic" in options and "tag id" not in options and "tag const" not in options
    assert any("tags not offered" in c.value for c in at.caption)


def test_long_model_name_and_path_are_shown_whole(monkeypatch, outlier_trace) -> None:
    at = _open(monkeypatch, outlier_trace, "overview")
    text = " ".join(m.value for m in at.markdown)
    assert LONG_NAME in text and str(outlier_trace) in text
    assert "Model" not in [m.label for m in at.metric]  # st.metric cuts it with an ellipsis
