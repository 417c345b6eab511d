"""A small JSON-over-HTTP client for recording from inference servers (stdlib only).

One :class:`HttpClient` per thread (it keeps its connection alive between requests).
Failures are :class:`ServerError`\\ s that say whether a retry may help: connection
refused or reset, timeouts, HTTP 5xx and 429 are transient; other HTTP errors and bodies
that are not JSON are not.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from moetrace.errors import ServerError

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path) of a server URL such as ``http://gpu1:8000``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerError(f"{url}: not an http(s) server URL (e.g. http://localhost:8000)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ServerError(f"{url}: bad port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


class HttpClient:
    """Requests to one server over one kept-alive connection (not thread-safe)."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.scheme, self.host, self.port, self.base = split_url(url)
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method: str, path: str, body: Any | None) -> http.client.HTTPResponse:
        where = f"{method} {self.base}{path}"
        data = None if body is None else json.dumps(body).encode()
        with self._io(where):
            conn = self._connection()
            conn.request(method, self.base + path, body=data, headers=self.headers)
            resp = conn.getresponse()
        if resp.status >= 400:
            text = _read(resp, where, self).decode("utf-8", "replace").strip()
            self.close()
            raise ServerError(
                f"{where}: HTTP {resp.status} {resp.reason}: {text[:300]}",
                transient=resp.status in TRANSIENT_STATUS,
                status=resp.status,
            )
        return resp

    def get_json(self, path: str) -> Any:
        resp = self._send("GET", path, None)
        return _parse(_read(resp, f"GET {path}", self), f"GET {path}")

    def post_json(self, path: str, body: Any) -> Any:
        resp = self._send("POST", path, body)
        return _parse(_read(resp, f"POST {path}", self), f"POST {path}")

    def post_events(self, path: str, body: Any) -> Iterator[Any]:
        """POST and yield the JSON objects of a server-sent-events stream up to ``[DONE]``.

        A stream that ends without ``data: [DONE]`` is a transient ServerError (the
        connection was cut)."""
        where = f"POST {path} (stream)"
        resp = self._send("POST", path, body)
        with self._io(where, "no data"):
            while True:
                line = resp.readline()
                if not line:
                    self.close()
                    raise ServerError(f"{where}: the stream ended before [DONE]", transient=True)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    resp.read()  # drain, so the connection can be reused
                    return
                yield _parse(payload, where)

    @contextmanager
    def _io(self, where: str, silence: str = "no answer") -> Iterator[None]:
        """Socket and protocol failures inside as transient ServerErrors (the connection
        is dropped: the next request opens a new one)."""
        try:
            yield
        except TimeoutError:
            self.close()
            raise ServerError(
                f"{where}: {silence} within {self.timeout:g} s", transient=True
            ) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            self.close()
            raise ServerError(f"{where}: {type(exc).__name__}: {exc}", transient=True) from None


def _read(resp: http.client.HTTPResponse, where: str, client: HttpClient) -> bytes:
    with client._io(f"{where} (the response was cut)"):
        return resp.read()


def _parse(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServerError(f"{where}: the answer is not JSON ({exc})") from None
