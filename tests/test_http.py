"""The HTTP adapter (embq_serving.http): every bad request gets a 4xx with a message, limits hold,
and a real uvicorn server on 127.0.0.1 answers and shuts down cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_serving import FEATURES, N_DENSE, ROWS, make_artifact, make_model_dir

LIMITS = {"max_batch": 16, "max_body_bytes": 64 * 1024}
# starlette 1.x nags that its TestClient will move from httpx to httpx2; it works with httpx.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http")
    return make_artifact(make_model_dir(root / "model"), "int4", root / "int4.embq")


@pytest.fixture(scope="module")
def predictor(artifact):
    from embq_serving.predictor import Predictor

    return Predictor(artifact)


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    from embq_serving.http import Limits, create_app

    with TestClient(create_app(predictor, Limits(**LIMITS))) as c:
        yield c


def row(seed: int = 0, **sparse_overrides) -> dict:
    rng = np.random.default_rng(seed)
    sparse = {f: rng.integers(0, n, 3).tolist() for f, n in zip(FEATURES, ROWS)}
    sparse.update(sparse_overrides)
    return {"dense": rng.standard_normal(N_DENSE).round(4).tolist(), "sparse": sparse}


def test_predict_answers_probabilities(client, predictor):
    rows = [row(s) for s in range(5)]
    r = client.post("/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    got = np.float32(r.json()["probabilities"])
    np.testing.assert_array_equal(got, predictor.predict_rows(rows))
    assert ((got > 0) & (got < 1)).all()


def test_healthz_and_metadata(client, predictor):
    assert client.get("/healthz").json() == {"status": "ok", "digest": predictor.digest}
    meta = client.get("/metadata").json()
    assert meta["digest"] == predictor.digest and meta["digest"].startswith("sha256:")
    assert meta == predictor.metadata()
    assert meta["inputs"]["sparse"]["feature_names"] == FEATURES


def _body(rows_json: str) -> bytes:
    return ('{"rows": [' + rows_json + "]}").encode()


GOOD_SPARSE = '"sparse": {"cat_0": [1], "cat_1": [2], "cat_2": [3]}'
ZEROS = ", ".join(["0"] * (N_DENSE - 1))

# name -> (request kwargs, expected status, a piece of the message)
BAD_REQUESTS = {
    "invalid JSON": ({"content": b'{"rows": [}'}, 400, "not valid JSON"),
    "empty body": ({"content": b""}, 400, "not valid JSON"),
    "not UTF-8": ({"content": b'{"rows": "\xff"}'}, 400, "not valid JSON"),
    "nested 10,000 deep": ({"content": b'{"rows": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"}, 400,
                            "recursion limit"),
    "body not an object": ({"json": [1, 2]}, 422, "body: Input should be an object"),
    "no rows key": ({"json": {"row": []}}, 422, "rows: Field required"),
    "extra top-level key": ({"json": {"rows": [row()], "x": 1}}, 422, "x: Extra inputs"),
    "rows not a list": ({"json": {"rows": {"a": 1}}}, 422, "rows: Input should be a valid array"),
    "row not an object": ({"json": {"rows": [[1, 2]]}}, 422, "rows[0]: Input should be an object"),
    "empty batch": ({"json": {"rows": []}}, 422, "batch is empty"),
    "oversized batch": ({"json": {"rows": [row()] * 17}}, 413, "at most 16"),
    "missing dense": ({"json": {"rows": [{"sparse": row()["sparse"]}]}}, 422, "rows[0].dense: Field required"),
    "wrong dense length": ({"json": {"rows": [{**row(), "dense": [0.0] * 3}]}}, 422,
                           "rows[0].dense must be a list of 13 numbers, got 3"),
    "dense not a list": ({"json": {"rows": [{**row(), "dense": 1.0}]}}, 422, "rows[0].dense"),
    "string in dense": ({"json": {"rows": [{**row(), "dense": ["1"] * N_DENSE}]}}, 422,
                        "rows[0].dense[0]: Input should be a valid number"),
    "bool in dense": ({"json": {"rows": [{**row(), "dense": [True] * N_DENSE}]}}, 422, "valid number"),
    "null in dense": ({"json": {"rows": [{**row(), "dense": [None] * N_DENSE}]}}, 422, "valid number"),
    "NaN": ({"content": _body('{"dense": [NaN, ' + ZEROS + "], " + GOOD_SPARSE + "}")}, 422,
            "rows[0].dense[0]: Input should be a finite number"),
    "Infinity": ({"content": _body('{"dense": [Infinity, ' + ZEROS + "], " + GOOD_SPARSE + "}")}, 422,
                 "finite number"),
    "float32 overflow": ({"content": _body('{"dense": [1e39, ' + ZEROS + "], " + GOOD_SPARSE + "}")}, 422,
                         "finite float32"),
    "unknown feature": ({"json": {"rows": [row(zz=[1])]}}, 422, "unknown features 'zz'"),
    "missing feature": ({"json": {"rows": [{**row(), "sparse": {"cat_0": [1]}}]}}, 422,
                        "missing features 'cat_1', 'cat_2'"),
    "id out of range": ({"json": {"rows": [row(), row(cat_1=[5, 1000])]}}, 422,
                        "'cat_1' row 1: id 1000 not in [0, 1000)"),
    "negative id": ({"json": {"rows": [row(cat_2=[-1])]}}, 422, "'cat_2' row 0: id -1 not in [0, 650)"),
    "id beyond int64": ({"json": {"rows": [row(cat_0=[2**64])]}}, 422, "int64"),
    "float id": ({"json": {"rows": [row(cat_0=[1.0])]}}, 422, "rows[0].sparse.cat_0[0]: Input should be a valid integer"),
    "string id": ({"json": {"rows": [row(cat_0=["1"])]}}, 422, "valid integer"),
    "ids not a list": ({"json": {"rows": [row(cat_0=1)]}}, 422, "rows[0].sparse.cat_0: Input should be a valid array"),
    "sparse not an object": ({"json": {"rows": [{**row(), "sparse": [1, 2, 3]}]}}, 422, "rows[0].sparse"),
    "body too large (Content-Length)": ({"content": b" " * (64 * 1024 + 1)}, 413, "at most 65536"),
    "bad Content-Length": ({"content": b"{}", "headers": {"content-length": "abc"}}, 400, "Content-Length"),
    "text/plain body": ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415,
                        "must be JSON (Content-Type: application/json), got 'text/plain'"),
    "form body": ({"data": {"rows": "1"}}, 415, "application/x-www-form-urlencoded"),
    "multipart body": ({"files": {"f": b"{}"}}, 415, "multipart/form-data"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(case, client):
    kwargs, status, message = BAD_REQUESTS[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_body_limit_holds_without_content_length(client):
    """A chunked body (no Content-Length) is cut off once more than the limit has been read."""
    sent = []

    def chunks():
        for _ in range(40):  # 40 x 4 KiB > 64 KiB
            sent.append(1)
            yield b" " * 4096

    r = client.post("/predict", content=chunks())
    assert r.status_code == 413 and "exceeds 65536 bytes" in r.json()["detail"]


def test_many_errors_are_summarised(client):
    rows = [{**row(), "dense": ["x"] * N_DENSE}] * 10
    detail = client.post("/predict", json={"rows": rows}).json()["detail"]
    assert "(and 125 more errors)" in detail and len(detail) < 1000


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/predict").status_code == 405
    assert client.post("/nothing", json={}).status_code == 404


def test_json_content_types_are_read(client):
    body = b'{"rows": [' + json.dumps(row(3)).encode() + b"]}"
    want = client.post("/predict", content=body).json()  # no Content-Type: read as JSON
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                 "application/vnd.api+json"):  # fmt: skip
        r = client.post("/predict", content=body, headers={"content-type": kind})
        assert r.status_code == 200 and r.json() == want, kind


def test_api_docs_are_off_unless_asked_for(predictor):
    """A production server does not publish its schema: /docs and /openapi.json answer 404
    unless the app is built with docs=True (embq-serve --docs)."""
    from fastapi.testclient import TestClient

    from embq_serving.http import create_app

    with TestClient(create_app(predictor)) as c:
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404
        assert c.get("/redoc").status_code == 404
    with TestClient(create_app(predictor, docs=True)) as c:
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json").json()
        assert "/predict" in schema["paths"]


def test_burst_of_malformed_requests_then_a_good_one(client):
    bad = [kwargs for kwargs, _, _ in BAD_REQUESTS.values()]
    statuses = [client.post("/predict", **bad[i % len(bad)]).status_code for i in range(200)]
    assert all(400 <= s < 500 for s in statuses)
    r = client.post("/predict", json={"rows": [row(1)]})
    assert r.status_code == 200 and len(r.json()["probabilities"]) == 1


# --------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, port: int, *extra: str) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "serving"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-m", "embq_serving.http", str(artifact), "--port", str(port),
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the server exited with {proc.returncode}: {proc.communicate()[1]}"
            )
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become healthy in time")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_uvicorn_server_serves_and_stops_cleanly(stop_signal, artifact, predictor):
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(artifact, port)
    try:
        wait_healthy(proc, url)
        rows = [row(s) for s in range(3)]
        r = httpx.post(url + "/predict", json={"rows": rows}, timeout=10.0)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(
            np.float32(r.json()["probabilities"]), predictor.predict_rows(rows)
        )
        assert httpx.post(url + "/predict", content=b"nope", timeout=10.0).status_code == 400
        proc.send_signal(stop_signal)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_server_refuses_a_tampered_artifact(artifact, tmp_path):
    copy = Path(shutil.copytree(artifact, tmp_path / "bad.embq"))
    table = copy / "tables" / "t_cat_0.safetensors"
    data = bytearray(table.read_bytes())
    data[-5] ^= 0xFF
    table.write_bytes(bytes(data))
    proc = start_server(copy, free_port())
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 3
    assert (
        "does not match its sha256" in err and "embq-serve: error: could not start serving" in err
    )
    assert "Traceback" not in err  # one clear line, not a stack


def test_server_rejects_bad_flags(artifact):
    proc = start_server(artifact, free_port(), "--max-batch", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--max-batch must be at least 1" in err
