"""The HTTP adapter: a FastAPI app around one `Predictor`, and the `embq-serve` command.

    embq-serve runs/demo/model.embq --host 127.0.0.1 --port 8080

Endpoints:
    POST /predict   {"rows": [{"dense": [floats], "sparse": {"feature": [ids, ...]}}, ...]}
                    -> {"probabilities": [float, ...]} (one per row, in order)
    GET  /healthz   {"status": "ok"} once the model is loaded
    GET  /metadata  the Predictor's metadata (tables, formats, bytes, features, inputs)

Every request the model cannot answer gets a 4xx with {"detail": "what was wrong"}: 400 for a
body that is not JSON or a bad Content-Length, 413 for a body or batch over the limits, 422 for
JSON of the wrong shape, types or values (unknown or missing features, wrong dense length, ids
out of range, NaN). The model is loaded once, at startup, by the app's lifespan; inference runs
in a worker thread so /healthz answers while a batch is being scored.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from typing_extensions import TypedDict

from embq.errors import EmbqError
from embq.runtime.kernel_choice import add_kernel_argument
from embq_serving.predictor import BasePredictor, Predictor

log = logging.getLogger("embq_serving.http")

DEFAULT_MAX_BATCH = 1024
# ~1 MB covers 512 rows of 13 dense values and 26 features x 20 ids; 8 MiB leaves room while
# bounding the memory and JSON-parsing time one request can take.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "::1", "localhost")
STARTUP_FAILURE = 3  # the exit status uvicorn uses when the app cannot start
# Errors named in one 422 message; a 1,000-row batch of garbage should not echo 1,000 lines.
_SHOWN_ERRORS = 5


# --------------------------------------------------------------------------- request schema

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Row(TypedDict):
    """One row: `n_dense` floats and, per sparse feature, a list of ids (a bag)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    dense: list[float]
    sparse: dict[str, list[int]]


class PredictRequest(TypedDict):
    """The body of POST /predict."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    rows: list[Row]


# Strict mode: JSON strings are not numbers, 1.0 is not an id, true is neither; NaN/Inf are
# refused. The TypedDicts validate to plain dicts and lists, which the Predictor takes as is.
_REQUEST = TypeAdapter(PredictRequest)


@dataclass(frozen=True)
class Limits:
    """Per-request limits.

    Attributes:
        max_batch: rows per request.
        max_body_bytes: bytes of request body, checked against Content-Length and while reading.
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class ModelLoadError(Exception):
    """The lifespan could not load the model (the reason is already logged, in one line)."""


class _DropReportedStartupTraceback(logging.Filter):
    """uvicorn logs the lifespan's traceback when startup fails. For a ModelLoadError the
    lifespan has already said what is wrong with the artifact, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().rstrip()
        return not (
            text.startswith("Traceback") and f"{ModelLoadError.__name__}:" in text.splitlines()[-1]
        )


class RequestError(Exception):
    """A request answered with `status` and {"detail": message} instead of a prediction."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _location(loc: tuple[Any, ...]) -> str:
    """('rows', 3, 'dense', 2) -> 'rows[3].dense[2]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_request(body: bytes, limits: Limits) -> list[dict[str, Any]]:
    """The rows of a POST /predict body, type-checked; RequestError (400/413/422) otherwise."""
    try:
        request = _REQUEST.validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            why = errors[0]["msg"].removeprefix("Invalid JSON: ")
            raise RequestError(400, f"the body is not valid JSON: {why}") from None
        shown = "; ".join(
            f"{_location(err['loc'])}: {err['msg']}" for err in errors[:_SHOWN_ERRORS]
        )
        more = (
            f" (and {len(errors) - _SHOWN_ERRORS} more errors)"
            if len(errors) > _SHOWN_ERRORS
            else ""
        )
        raise RequestError(422, f"invalid request: {shown}{more}") from None
    rows = request["rows"]
    if not rows:
        raise RequestError(422, 'the batch is empty; send at least one row in "rows"')
    if len(rows) > limits.max_batch:
        raise RequestError(
            413,
            f"the batch has {len(rows)} rows; this server takes at most {limits.max_batch} per request",
        )
    return rows


def answer_predict(predictor: BasePredictor, body: bytes, limits: Limits) -> dict[str, list[float]]:
    """Parse, validate and score one /predict body (blocking; run it off the event loop)."""
    rows = parse_request(body, limits)
    try:
        probabilities = predictor.predict_rows(rows)
    except EmbqError as e:  # InvalidInputError: features, dense length, id ranges, values
        raise RequestError(422, str(e)) from None
    return {"probabilities": probabilities.tolist()}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than `max_bytes` by Content-Length or by bytes read
    (a chunked or lying client cannot make the server buffer more than the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise RequestError(
                413, f"the body is {int(declared)} bytes; this server takes at most {max_bytes}"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(
                413, f"the body exceeds {max_bytes} bytes, the most this server takes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- the app


def create_app(model: str | os.PathLike | BasePredictor, limits: Limits | None = None,
               num_threads: int | None = None, kernel: str | None = None) -> FastAPI:  # fmt: skip
    """A FastAPI app serving `model`.

    Args:
        model: an artifact path, loaded once at startup by the lifespan, or a loaded predictor
            (a `Predictor`, or an `export.ScriptedPredictor` serving a TorchScript file; shared,
            e.g. by tests that build several apps).
        limits: request limits (defaults: 1024 rows, 8 MiB).
        num_threads: torch intra-op threads, set when the model is loaded.
        kernel: the runtime's kernel choice for a model loaded from a path (see `Predictor`).

    Returns:
        The app; run it with uvicorn, or drive it with fastapi.testclient.TestClient (use it as
        a context manager so the lifespan runs).
    """
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(model, BasePredictor):
            app.state.predictor = model
        else:
            try:
                app.state.predictor = Predictor(model, num_threads=num_threads, kernel=kernel)
            except EmbqError as e:
                log.error("embq-serve: cannot load %s: %s", model, e)
                raise ModelLoadError(str(e)) from None
            log.info("embq-serve: loaded %s", model)
        yield
        app.state.predictor = None  # drop the model's memory once the server has drained

    app = FastAPI(title="embq serving", version="0.1.0", lifespan=lifespan)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.post(
        "/predict",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _REQUEST.json_schema()}}}},
    )  # fmt: skip
    async def predict(request: Request) -> Any:
        """Click probabilities for a batch of rows (see the module docstring for the body)."""
        try:
            body = await read_body(request, limits.max_body_bytes)
            # Parsing and scoring are CPU-bound: keep them off the event loop.
            return await run_in_threadpool(
                answer_predict, request.app.state.predictor, body, limits
            )
        except RequestError as e:
            return error(e)

    @app.get("/healthz")
    async def healthz(request: Request) -> Any:
        """Liveness and readiness: 200 once the model is loaded."""
        if getattr(request.app.state, "predictor", None) is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata(request: Request) -> Any:
        """Tables, formats, bytes, features and the inputs /predict expects."""
        return request.app.state.predictor.metadata()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: log it with its traceback, answer without internals.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    return app


# --------------------------------------------------------------------------- embq-serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embq-serve", description="Serve an embq artifact over HTTP (FastAPI + uvicorn).",
        epilog="Example: embq-serve runs/demo/model.embq --host 127.0.0.1 --port 8080",
    )  # fmt: skip
    parser.add_argument("model", help="artifact directory (X.embq)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"most rows per request (default {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body in bytes (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        help="open connections before the server answers 503 (default 64)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_kernel_argument(parser)
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `embq-serve`: 0 after a clean shutdown, 2 for bad arguments, 3 when the
    model cannot be loaded or the port cannot be bound.

    uvicorn handles SIGINT/SIGTERM: it stops accepting connections, finishes the requests in
    flight (up to 30 s), runs the lifespan's shutdown and returns.
    """
    import uvicorn

    args = build_parser().parse_args(argv)
    for flag, value in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes),
                        ("--max-concurrency", args.max_concurrency)):  # fmt: skip
        if value < 1:
            print(f"embq-serve: error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if not os.path.isdir(args.model):
        print(f"embq-serve: error: {args.model} is not an artifact directory", file=sys.stderr)
        return 2
    # Our logger only: a root configuration would also print every library's INFO chatter.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    if args.host not in LOOPBACK:
        log.warning("embq-serve: binding %s exposes the model beyond this machine", args.host)
    app = create_app(
        args.model, Limits(args.max_batch, args.max_body_bytes), args.threads, args.kernel
    )
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        limit_concurrency=args.max_concurrency, timeout_graceful_shutdown=30,
    ))  # fmt: skip
    # After a graceful shutdown uvicorn re-raises the signal it caught, to the handler that was
    # installed before it ran. Python's defaults would turn that into a KeyboardInterrupt
    # traceback (SIGINT) or a kill (SIGTERM); this handler makes a requested stop exit 0.
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    logging.getLogger("uvicorn.error").addFilter(_DropReportedStartupTraceback())
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits with STARTUP_FAILURE (3): no model, port taken
        if e.code != STARTUP_FAILURE:
            raise
    if not server.started:
        print(
            f"embq-serve: error: could not start serving {args.model} (see the log above)",
            file=sys.stderr,
        )
        return STARTUP_FAILURE
    if stopped_by:
        log.info("embq-serve: stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
