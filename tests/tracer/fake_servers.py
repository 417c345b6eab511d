"""In-process HTTP servers that answer like vLLM and SGLang with routed experts on.

A real HTTP stack (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive, chunk-free
server-sent events on a closed connection) that follows the engines' documented schemas:

- vLLM ``POST /v1/completions``: ``prompt_routed_experts`` (response) and
  ``choices[i].routed_experts`` (nested int lists ``[tokens][layers][top_k]``), the layer
  axis the MoE layers only (``layer_axis="moe"``, newer vLLM) or every hidden layer with
  dense layers as zeros (``"all"``, older vLLM); ``prompt_token_ids`` / ``token_ids``
  with ``return_token_ids``; streams: the first chunk carries the prompt's routing, each
  token chunk its row.
- SGLang ``POST /generate`` with ``return_routed_experts``: ``meta_info.routed_experts``
  base64 of the flat row-major int32 (or ``dtype``) array over every hidden layer, P + N
  - 1 rows; ``n > 1`` answers a list; streams: routing on each index's final chunk.

Routing is a deterministic function of the prompt (prefill) and of (prompt, completion
index) (decode), skewed so analyses find structure; :meth:`FakeServer.expected` gives it
in MoE-layer terms. ``faults`` makes the server fail the way servers fail, per prompt and
attempt: ``500``, ``429``, ``timeout``, ``reset``, ``truncate``, ``misshape``, ``missing``,
``cut_stream``, ``bad_json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


@dataclass
class FakeModel:
    name: str = "fake/moe-a1b"
    num_layers: int = 6
    moe_layers: tuple[int, ...] = (1, 2, 3, 4, 5)
    num_experts: int = 16
    top_k: int = 2


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class FakeServer:
    engine: str = "vllm"
    model: FakeModel = field(default_factory=FakeModel)
    layer_axis: str = "moe"
    """vLLM only: ``moe`` (MoE layers) or ``all`` (every hidden layer, dense rows 0)."""
    dtype: str = "int32"
    """SGLang: the wire dtype of routed_experts."""
    send_dtype_field: bool = False
    latency: float = 0.0
    faults: dict[str, list[str]] = field(default_factory=dict)
    """Prompt text -> faults for its 1st, 2nd... attempt (then answers normally)."""
    fault_fn: Callable[[str, int], str | None] | None = None
    calls: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)

    # ------------------------------------------------------------------ routing
    def lengths(self, prompt: str, index: int, max_tokens: int) -> tuple[int, int]:
        p = max(1, len(prompt.split()))
        n = max(1, max_tokens - _seed(prompt, index, "n") % 3)
        return p, n

    def _draw(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """k distinct experts per (row, MoE layer), Zipf-skewed, each layer its own hot
        experts (Gumbel top-k: sampling without replacement in proportion)."""
        m = self.model
        layers = len(m.moe_layers)
        logp = -1.1 * np.log(np.arange(1, m.num_experts + 1))
        keys = logp + rng.gumbel(size=(rows, layers, m.num_experts))
        top = np.argsort(-keys, axis=2)[:, :, : m.top_k]
        shift = 3 * np.arange(layers)[None, :, None]
        return (top + shift) % m.num_experts

    def expected(self, prompt: str, index: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(prefill rows, decode rows) in MoE-layer terms: ``(tokens, moe layers, top_k)``."""
        p, n = self.lengths(prompt, index, max_tokens)
        pre = self._draw(np.random.default_rng(_seed(prompt, "prefill")), p)
        dec = self._draw(np.random.default_rng(_seed(prompt, index, "decode")), n - 1)
        return pre, dec

    def _wire(self, rows: np.ndarray, axis: str) -> np.ndarray:
        if axis == "moe":
            return rows
        full = np.zeros((rows.shape[0], self.model.num_layers, self.model.top_k), np.int64)
        full[:, list(self.model.moe_layers)] = rows
        return full

    # ------------------------------------------------------------------ answers
    def vllm(self, body: dict[str, Any], fault: str | None) -> tuple[Any, list[Any] | None]:
        prompt, n, max_tokens = body["prompt"], int(body.get("n", 1)), int(body["max_tokens"])
        axis = self.layer_axis
        pre = self._wire(self.expected(prompt, 0, max_tokens)[0], axis)
        p = pre.shape[0]
        choices, chunks = [], []
        for i in range(n):
            _, dec = self.expected(prompt, i, max_tokens)
            dec = self._wire(dec, axis)
            _, ntok = self.lengths(prompt, i, max_tokens)
            if fault == "truncate":
                dec = dec[: max(0, dec.shape[0] - 2)]
            if fault == "misshape":
                dec = dec[:, :, :1]
            ids = [100 + t for t in range(ntok)]
            ch = {"index": i, "text": " ".join(f"t{t}" for t in ids), "logprobs": None,
                  "finish_reason": "length", "stop_reason": None, "token_ids": ids,
                  "prompt_logprobs": None, "routed_experts": dec.tolist()}  # fmt: skip
            if fault == "missing":
                ch["routed_experts"] = None
            choices.append(ch)
            for t in range(ntok):
                row = dec[t : t + 1].tolist() if t < dec.shape[0] else None
                chunks.append({"index": i, "text": f" t{ids[t]}", "logprobs": None,
                               "finish_reason": "length" if t == ntok - 1 else None,
                               "token_ids": [ids[t]], "routed_experts": row})  # fmt: skip
        head = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name}  # fmt: skip
        prompt_rows = None if fault == "missing" else pre.tolist()
        usage = {"prompt_tokens": p, "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
        usage["total_tokens"] = p + usage["completion_tokens"]
        whole = {**head, "choices": choices, "usage": usage,
                 "prompt_token_ids": list(range(p)), "prompt_routed_experts": prompt_rows,
                 "kv_transfer_params": None}  # fmt: skip
        events = [{**head, "choices": [c], **({"prompt_routed_experts": prompt_rows,
                   "prompt_token_ids": list(range(p))} if k == 0 else {})}
                  for k, c in enumerate(chunks)]  # fmt: skip
        return whole, events

    def sglang(self, body: dict[str, Any], fault: str | None) -> tuple[Any, list[Any] | None]:
        sp = body.get("sampling_params") or {}
        prompt, n, max_tokens = body["text"], int(sp.get("n", 1)), int(sp["max_new_tokens"])
        outs, events = [], []
        for i in range(n):
            pre, dec = self.expected(prompt, i, max_tokens)
            p, ntok = self.lengths(prompt, i, max_tokens)
            flat = self._wire(np.concatenate([pre, dec]), "all")
            if fault == "truncate":
                flat = flat[:-1]
            if fault == "misshape":
                flat = flat[:, :, :1]
            data = flat.astype(self.dtype).tobytes()
            meta: dict[str, Any] = {
                "id": f"req-{i}", "prompt_tokens": p, "completion_tokens": ntok,
                "cached_tokens": 0, "finish_reason": {"type": "length", "length": ntok},
                "e2e_latency": 0.01, "routed_experts": base64.b64encode(data).decode("utf-8"),
            }  # fmt: skip
            if self.send_dtype_field:
                meta["routed_experts_dtype"] = self.dtype
            if fault == "missing":
                del meta["routed_experts"]
            text = " ".join(f"t{t}" for t in range(ntok))
            outs.append({"text": text, "output_ids": list(range(ntok)), "meta_info": meta,
                         "index": i})  # fmt: skip
            for t in range(ntok):
                last = t == ntok - 1
                m = dict(meta) if last else {k: v for k, v in meta.items()
                                             if k not in ("routed_experts", "finish_reason")}  # fmt: skip
                m["completion_tokens"] = t + 1
                events.append({"text": " ".join(f"t{u}" for u in range(t + 1)),
                               "meta_info": m, "index": i})  # fmt: skip
        return (outs[0] if n == 1 else outs), events

    # ------------------------------------------------------------------ server
    def __enter__(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    model = {"id": fake.model.name, "object": "model", "max_model_len": 4096}
                    self._json(200, {"object": "list", "data": [model]})
                else:
                    self._json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                want = "/v1/completions" if fake.engine == "vllm" else "/generate"
                if self.path != want:
                    self._json(404, {"detail": "Not Found"})
                    return
                prompt = body["prompt"] if fake.engine == "vllm" else body["text"]
                attempt = fake.calls[prompt]
                fake.calls[prompt] += 1
                plan = fake.faults.get(prompt, [])
                fault = plan[attempt] if attempt < len(plan) else None
                if fake.fault_fn is not None:
                    fault = fake.fault_fn(prompt, attempt) or fault
                if fake.latency:
                    time.sleep(fake.latency)
                if fault in ("500", "429"):
                    self._json(int(fault), {"object": "error", "message": "boom"})
                    return
                if fault == "timeout":
                    time.sleep(3.0)
                    self.close_connection = True
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")  # fmt: skip
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "bad_json":
                    data = b"<html>proxy error</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                make = fake.vllm if fake.engine == "vllm" else fake.sglang
                whole, events = make(body, fault)
                if not body.get("stream"):
                    self._json(200, whole)
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    cut = len(events) // 2 if fault == "cut_stream" else None
                    for ev in events[:cut]:
                        self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                    if cut is None:
                        self.wfile.write(b"data: [DONE]\n\n")
                fake.answered[prompt] += fault is None

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up (a killed recorder) is not news

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
