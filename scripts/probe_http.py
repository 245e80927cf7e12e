"""HTTP tries of scripts/probe_robustness.py against an `embq-serve` on loopback: malformed and
valid requests over raw sockets, stalled heads and bodies, disconnects mid-body."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import numpy as np

PROB_TOL = 1e-5  # float32 probabilities against the float64 reference


def exchange(port: int, data: bytes, timeout: float = 10.0, close_after: float | None = None,
             pieces: int = 1) -> tuple[int | None, bytes]:  # fmt: skip
    """Send raw bytes (in `pieces` writes), read the answer until the server closes or
    `timeout`; (status, body). `close_after`: close our side that many seconds after sending,
    without reading."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        step = -(-len(data) // pieces)
        try:
            for k in range(0, len(data), step):
                s.sendall(data[k : k + step])
                if pieces > 1:
                    time.sleep(0.05)
        except OSError:  # the server answered and closed before the rest was sent
            pass
        if close_after is not None:
            time.sleep(close_after)
            return None, b""
        answer = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if _complete(answer):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    if not answer.startswith(b"HTTP/"):
        return None, answer
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[-1]


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def request(body: bytes, content_type: str | None = "application/json", method: str = "POST",
            path: str = "/predict", extra: bytes = b"") -> bytes:  # fmt: skip
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + extra + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


@dataclass
class HttpCase:
    """One request: `valid` requests must answer the reference probabilities, `health` ones
    /healthz's {"status": "ok"} (or a 4xx), the others a 4xx. `pieces`: send the bytes in that
    many writes, 50 ms apart."""

    name: str
    data: bytes
    valid: bool = False
    health: bool = False
    pieces: int = 1

    def run(self, url: str, port: int, expected: np.ndarray) -> dict:
        result = {"category": "http", "name": self.name}
        try:
            status, body = exchange(port, self.data, pieces=self.pieces)
        except OSError as e:
            return {**result, "outcome": "clean_refusal" if not self.valid else "silent_wrong",
                    "detail": f"connection refused or reset: {e}"}  # fmt: skip
        if status is None:
            outcome = "silent_wrong" if self.valid else "clean_refusal"
            return {**result, "outcome": outcome, "detail": "closed without an answer"}
        if status >= 500:
            return {**result, "outcome": "traceback", "detail": f"{status}: {body[:200]!r}"}
        if self.health and status == 200:
            ok = json.loads(body).get("status") == "ok"
            return {**result, "outcome": "identical_answer" if ok else "silent_wrong",
                    "detail": f"{status} {body[:120]!r}"}  # fmt: skip
        if not self.valid:
            if 400 <= status < 500:
                return {**result, "outcome": "clean_refusal", "detail": f"{status} {body[:120]!r}"}
            return {**result, "outcome": "silent_wrong", "detail": f"{status} {body[:200]!r}"}
        if status != 200:
            return {**result, "outcome": "silent_wrong", "detail": f"valid request got {status}: "
                                                              f"{body[:200]!r}"}  # fmt: skip
        got = np.asarray(json.loads(body)["probabilities"], dtype=np.float64)
        if got.shape == expected.shape and np.all(np.abs(got - expected) <= PROB_TOL):
            return {**result, "outcome": "identical_answer", "detail": ""}
        return {**result, "outcome": "silent_wrong", "detail": f"{got} vs reference {expected}"}


def http_cases(meta: dict, rng, dense: np.ndarray, sparse: dict, quick: bool) -> list[HttpCase]:
    """Malformed and valid requests; `dense` / `sparse` is the batch whose float64 reference
    probabilities the caller holds."""
    features = list(meta["inputs"]["sparse"]["feature_names"])
    rows = meta["inputs"]["sparse"]["table_rows"]
    good = [{"dense": [float(x) for x in dense[i]], "sparse": {f: sparse[f][i] for f in features}}
            for i in range(dense.shape[0])]  # fmt: skip
    canonical = json.dumps({"rows": good}).encode()

    def with_row(**change) -> bytes:
        rows_ = json.loads(canonical)["rows"]
        r = rows_[0]
        for key, value in change.items():
            if key in ("dense", "sparse"):
                r[key] = value
            else:
                r["sparse"][key] = value
        return json.dumps({"rows": rows_}).encode()

    f0 = features[0]
    cases = [
        HttpCase("valid: canonical", request(canonical), True),
        HttpCase("valid: indented", request(json.dumps({"rows": good}, indent=3).encode()), True),
        HttpCase("valid: keys reordered",
                 request(json.dumps({"rows": [{"sparse": dict(reversed(list(r["sparse"].items()))),
                                               "dense": r["dense"]} for r in good]}).encode()), True),
        HttpCase("valid: unicode-escaped keys",
                 request(json.dumps({"rows": good}, ensure_ascii=True).replace('"rows"', '"\\u0072ows"').encode()), True),
        HttpCase("valid: charset parameter", request(canonical, "application/json; charset=utf-8"), True),
        HttpCase("valid: +json media type", request(canonical, "application/vnd.embq+json"), True),
        HttpCase("valid: no content type", request(canonical, None), True),
        HttpCase("invalid JSON", request(b'{"rows": [}')),
        HttpCase("empty body", request(b"")),
        HttpCase("not UTF-8", request(b'{"rows": "\xff"}')),
        HttpCase("deep nesting", request(b'{"rows": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")),
        HttpCase("NaN dense", request(with_row(dense=[12345.5] + good[0]["dense"][1:])
                                      .replace(b"12345.5", b"NaN", 1))),
        HttpCase("1e400 dense", request(with_row(dense=[12345.5] + good[0]["dense"][1:])
                                        .replace(b"12345.5", b"1e400", 1))),
        HttpCase("1e39 dense (float32 overflow)", request(with_row(dense=[1e39] * len(good[0]["dense"])))),
        HttpCase("dense too short", request(with_row(dense=[0.0]))),
        HttpCase("dense strings", request(with_row(dense=["1"] * len(good[0]["dense"])))),
        HttpCase("unknown feature", request(with_row(zz=[1]))),
        HttpCase("missing feature", request(with_row(sparse={f0: [1]}))),
        HttpCase("negative id", request(with_row(**{f0: [-1]}))),
        HttpCase("id == rows", request(with_row(**{f0: [rows[f0]]}))),
        HttpCase("id 2^63", request(with_row(**{f0: [2**63]}))),
        HttpCase("id 2^64", request(with_row(**{f0: [2**64]}))),
        HttpCase("float id", request(with_row(**{f0: [1.0]}))),
        HttpCase("string id", request(with_row(**{f0: ["1"]}))),
        HttpCase("bool id", request(with_row(**{f0: [True]}))),
        HttpCase("null id", request(with_row(**{f0: [None]}))),
        HttpCase("nested ids", request(with_row(**{f0: [[1]]}))),
        HttpCase("rows empty", request(b'{"rows": []}')),
        HttpCase("rows not a list", request(b'{"rows": {"a": 1}}')),
        HttpCase("extra top-level key", request(json.dumps({"rows": good, "x": 1}).encode())),
        HttpCase("65 rows (max 64)", request(json.dumps({"rows": good * 17}).encode())),
        HttpCase("body over the limit", request(b" " * ((1 << 20) + 1))),
        HttpCase("text/plain", request(canonical, "text/plain")),
        HttpCase("form body", request(b"rows=1", "application/x-www-form-urlencoded")),
        HttpCase("multipart", request(canonical, "multipart/form-data; boundary=x")),
        HttpCase("GET /predict", request(b"", None, "GET")),
        HttpCase("PUT /predict", request(canonical, method="PUT")),
        HttpCase("DELETE /predict", request(b"", None, "DELETE")),
        HttpCase("unknown path", request(canonical, path="/predict2")),
        HttpCase("/docs (off)", request(b"", None, "GET", "/docs")),
        HttpCase("/openapi.json (off)", request(b"", None, "GET", "/openapi.json")),
        HttpCase("path traversal", request(b"", None, "GET", "/../../etc/passwd")),
        HttpCase("bad Content-Length", b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"),
        HttpCase("two Content-Lengths", b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                 b"Content-Length: 3\r\n\r\n{}"),
        HttpCase("Content-Length and chunked", b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2"
                 b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        HttpCase("Content-Length longer than the body", b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{}"),
        HttpCase("garbage request line", b"\x00\x01\x02 garbage \xff\r\n\r\n"),
        HttpCase("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        HttpCase("header line of 100 kB", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000
                 + b"\r\n\r\n", health=True),
        HttpCase("200 kB of headers, slowly", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                 + b"".join(b"X-%d: %s\r\n" % (k, b"a" * 1000) for k in range(200)) + b"\r\n", pieces=20),
        HttpCase("header without colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n"),
        HttpCase("NUL in the target", b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n"),
        HttpCase("URL of 70 kB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]  # fmt: skip
    # seeded junk: random bytes as a body, and the canonical body cut at random places
    for k in range(10 if quick else 40):
        cases.append(HttpCase(f"random body {k}", request(rng.bytes(int(rng.integers(1, 2000))))))
        cut = int(rng.integers(1, len(canonical) - 1))
        cases.append(HttpCase(f"body cut at byte {cut}", request(canonical[:cut])))
    for k in range(5 if quick else 20):
        data = bytearray(canonical)
        for _ in range(3):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        cases.append(HttpCase(f"3 random bytes changed {k}", request(bytes(data))))
    return cases


def stall_tries(url: str, port: int, heads: int, bodies: int) -> dict:
    """Stalled request heads and bodies, then /healthz and /predict timed while they stall, then
    whether the server closes each once its deadline passes; and disconnects mid-body."""
    import httpx

    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    held = []
    for k in range(heads + bodies):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head if k < heads else head + b"Content-Length: 900\r\n\r\n{\"rows\": [")
        held.append(s)
    time.sleep(0.3)
    starved, results = False, []
    start = time.monotonic()
    try:
        health = httpx.get(url + "/healthz", timeout=5)
        health_s = time.monotonic() - start
        predict = httpx.post(url + "/predict", content=b'{"rows": []}', timeout=10)
        if health.status_code != 200 or health_s > 1.5 or predict.status_code != 422:
            starved = True
        detail = f"/healthz {health.status_code} in {health_s:.3f} s, /predict {predict.status_code}"
    except httpx.HTTPError as e:
        starved, detail = True, f"no answer while stalled: {e}"
    results.append({"category": "http stall", "name": "/healthz while 100 clients stall",
                    "outcome": "starved" if starved else "clean_refusal", "detail": detail})  # fmt: skip
    deadline = time.monotonic() + 8.0  # one deadline for all: their timeouts run together
    for k, s in enumerate(held):
        closed = False
        try:
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                if s.recv(65536) == b"":
                    closed = True
                    break
        except TimeoutError:
            closed = False
        except OSError:  # reset by the server: closed too
            closed = True
        s.close()
        kind = "head" if k < heads else "body"
        results.append({"category": "http stall", "name": f"stalled {kind} {k}",
                        "outcome": "clean_refusal" if closed else "starved",
                        "detail": "closed by the server" if closed else "still open after 8 s"})  # fmt: skip
    for k in range(5):
        exchange(port, head + b"Content-Length: 900\r\n\r\n{\"rows\": [", close_after=0.2)
        results.append({"category": "http stall", "name": f"disconnect mid-body {k}",
                        "outcome": "clean_refusal", "detail": "checked in the server log"})  # fmt: skip
    time.sleep(0.5)
    return {"results": results, "starved": starved}
