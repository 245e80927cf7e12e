"""The HTTP adapter: a FastAPI app around one `Predictor`, and the `embq-serve` command.

    embq-serve runs/demo/model.embq --host 127.0.0.1 --port 8080

Endpoints:
    POST /predict   {"rows": [{"dense": [floats], "sparse": {"feature": [ids, ...]}}, ...]}
                    -> {"probabilities": [float, ...]} (one per row, in order)
    GET  /healthz   {"status": "ok", "digest": ...} while the artifact loaded is the one on disk;
                    503 {"status": "loading"} before, 503 {"status": "unhealthy", "reason": ...}
                    once a file of it changed on disk (artifacts are immutable once published)
    GET  /metadata  the Predictor's metadata (digest, tables, formats, bytes, features, inputs)
    /docs, /openapi.json only with --docs (a production server does not publish its schema)

Every request the model cannot answer gets a 4xx with {"detail": "what was wrong"}: 400 for a
body that is not JSON or a bad Content-Length, 408 for a body that does not arrive within
--body-timeout, 413 for a body or batch over the limits, 415 for a Content-Type other than JSON,
422 for JSON of the wrong shape, types or values (unknown or missing features, wrong dense
length, ids out of range, NaN); 503 when --max-concurrency requests are already being scored,
or the artifact changed on disk. The model is loaded once, at startup, by the app's lifespan;
inference runs in a worker thread so /healthz answers while a batch is being scored.

Slow and broken clients (`embq_serving.protocol`): a connection must deliver its request head
within --head-timeout seconds, its body within --body-timeout; at most --max-connections are
open at once; /healthz and /metadata are never refused for load; a client that disconnects
mid-body is logged in one line.
"""

from __future__ import annotations

import argparse
import asyncio
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
from starlette.requests import ClientDisconnect
from typing_extensions import TypedDict

from embq.errors import ArtifactError, EmbqError
from embq.runtime.kernel_choice import add_kernel_argument
from embq_serving.predictor import BasePredictor, Predictor

log = logging.getLogger("embq_serving.http")

DEFAULT_MAX_BATCH = 1024
# ~1 MB covers 512 rows of 13 dense values and 26 features x 20 ids; 8 MiB leaves room while
# bounding the memory and JSON-parsing time one request can take.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0  # s for a whole body: 8 MiB at 2.2 Mbit/s
DEFAULT_HEAD_TIMEOUT = 10.0  # s for the request line and headers
DEFAULT_MAX_IN_FLIGHT = 64  # /predict requests read and waiting for, or under, the model
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_WATCH_INTERVAL = 2.0  # s between checks of the artifact's files
JSON_TYPES = ("application/json",)  # and any application/...+json
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
        body_timeout: seconds for a whole request body to arrive (408 after).
        max_in_flight: /predict requests whose body was read and that wait for, or run on, the
            model; beyond it /predict answers 503 at once (/healthz and /metadata never do).
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


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
    """A request answered with `status` and {"detail": message} instead of a prediction;
    `close`: close the connection after answering (its body was not read to the end)."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


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
    except ArtifactError as e:  # the artifact changed on disk: the server's fault, not the request's
        raise RequestError(503, str(e)) from None
    except EmbqError as e:  # InvalidInputError: features, dense length, id ranges, values
        raise RequestError(422, str(e)) from None
    return {"probabilities": probabilities.tolist()}


def check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (application/json, application/...+json; a request
    without Content-Type is read as JSON)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        raise RequestError(
            415, f"the body must be JSON (Content-Type: application/json), got {declared!r}",
            close=True,
        )  # fmt: skip


async def read_body(request: Request, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The request body, refusing (413) more than `max_bytes` by Content-Length or by bytes read
    (a chunked or lying client cannot make the server buffer more than the limit), and (408) a
    body that has not arrived whole within `timeout` seconds (a stalled client does not hold
    its connection). A client that disconnects first raises ClientDisconnect."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}", close=True)
        if int(declared) > max_bytes:
            raise RequestError(
                413, f"the body is {int(declared)} bytes; this server takes at most {max_bytes}",
                close=True,
            )  # fmt: skip
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(
                        413, f"the body exceeds {max_bytes} bytes, the most this server takes",
                        close=True,
                    )  # fmt: skip
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within {timeout:g} s ({size} bytes came)",
            close=True,
        ) from None  # fmt: skip
    return b"".join(chunks)


# --------------------------------------------------------------------------- the app


def create_app(model: str | os.PathLike | BasePredictor, limits: Limits | None = None,
               num_threads: int | None = None, kernel: str | None = None, *,
               expect_digest: str | None = None, docs: bool = False,
               watch_interval: float | None = DEFAULT_WATCH_INTERVAL) -> FastAPI:  # fmt: skip
    """A FastAPI app serving `model`.

    Args:
        model: an artifact path, loaded once at startup by the lifespan, or a loaded predictor
            (a `Predictor`, or an `export.ScriptedPredictor` serving a TorchScript file; shared,
            e.g. by tests that build several apps).
        limits: request limits (defaults: 1024 rows, 8 MiB, 30 s per body, 64 in flight).
        num_threads: torch intra-op threads, set when the model is loaded.
        kernel: the runtime's kernel choice for a model loaded from a path (see `Predictor`).
        expect_digest: refuse to start unless the artifact's digest is this ("sha256:...").
        docs: serve /docs and /openapi.json (off: a production server does not publish them).
        watch_interval: seconds between checks of the artifact's files on disk
            (`Predictor.check_files`); None checks only before each forward.

    Returns:
        The app; run it with uvicorn, or drive it with fastapi.testclient.TestClient (use it as
        a context manager so the lifespan runs).
    """
    limits = limits or Limits()

    async def watch(predictor: BasePredictor, interval: float) -> None:
        """Compare the artifact's files with their state at load, until the server stops."""
        while predictor.health() is None:
            await asyncio.sleep(interval)
            if predictor.check_files():
                log.error("embq-serve: %s; /healthz answers 503 and /predict refuses from now on",
                          predictor.health())  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.in_flight = 0
        if isinstance(model, BasePredictor):
            app.state.predictor = model
        else:
            try:
                app.state.predictor = Predictor(model, num_threads=num_threads, kernel=kernel,
                                                expect_digest=expect_digest)  # fmt: skip
            except Exception as e:  # every refusal is an EmbqError; anything else is a bug
                reason = str(e) if isinstance(e, EmbqError) else f"{type(e).__name__}: {e}"
                log.error("embq-serve: cannot load %s: %s", model, reason)
                log.debug("embq-serve: the load failure in full", exc_info=True)
                app.state.load_error = reason
                raise ModelLoadError(reason) from None
            log.info("embq-serve: loaded %s (digest %s)", model, app.state.predictor.digest)
        watcher = None
        if watch_interval is not None:
            watcher = asyncio.create_task(watch(app.state.predictor, watch_interval))
        yield
        if watcher is not None:
            watcher.cancel()
        app.state.predictor = None  # drop the model's memory once the server has drained

    app = FastAPI(title="embq serving", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)  # fmt: skip

    def error(e: RequestError) -> JSONResponse:
        headers = {"connection": "close"} if e.close else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.post(
        "/predict",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _REQUEST.json_schema()}}}},
    )  # fmt: skip
    async def predict(request: Request) -> Any:
        """Click probabilities for a batch of rows (see the module docstring for the body)."""
        predictor = request.app.state.predictor
        try:
            unhealthy = predictor.health()
            if unhealthy is not None:
                raise RequestError(503, unhealthy, close=True)
            check_content_type(request)
            body = await read_body(request, limits.max_body_bytes, limits.body_timeout)
            if request.app.state.in_flight >= limits.max_in_flight:
                raise RequestError(
                    503, f"the server is busy: {limits.max_in_flight} requests are being scored; "
                    "retry shortly",
                )  # fmt: skip
            request.app.state.in_flight += 1
            try:
                # Parsing and scoring are CPU-bound: keep them off the event loop.
                return await run_in_threadpool(answer_predict, predictor, body, limits)
            finally:
                request.app.state.in_flight -= 1
        except RequestError as e:
            return error(e)
        except ClientDisconnect:
            client = request.client
            where = f"{client.host}:{client.port}" if client else "a client"
            log.info("embq-serve: %s disconnected before sending the whole request body", where)
            return JSONResponse({"detail": "client disconnected"}, status_code=400)

    @app.get("/healthz")
    async def healthz(request: Request) -> Any:
        """Liveness and readiness: 200 while the loaded artifact is the one on disk."""
        predictor = getattr(request.app.state, "predictor", None)
        if predictor is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        reason = predictor.health()
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return {"status": "ok", "digest": getattr(predictor, "digest", None)}

    @app.get("/metadata")
    async def metadata(request: Request) -> Any:
        """Digest, tables, formats, bytes, features and the inputs /predict expects."""
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
        default=DEFAULT_MAX_IN_FLIGHT,
        help="/predict requests being scored or waiting for the model before /predict answers "
        f"503 (default {DEFAULT_MAX_IN_FLIGHT}); /healthz and /metadata are never refused",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"open connections; more are closed at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT,
        help="seconds for a request line and headers to arrive, from the connection opening or "
        f"the previous response (default {DEFAULT_HEAD_TIMEOUT:g})",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        help=f"seconds for a whole request body to arrive (default {DEFAULT_BODY_TIMEOUT:g})",
    )
    parser.add_argument(
        "--expect-digest",
        metavar="sha256:HEX",
        help="refuse to start unless the artifact's digest is this (see `embq seal`, /metadata)",
    )
    parser.add_argument(
        "--watch-interval",
        type=float,
        default=DEFAULT_WATCH_INTERVAL,
        help="seconds between checks that the artifact's files are unchanged on disk "
        f"(default {DEFAULT_WATCH_INTERVAL:g}); a change makes /healthz answer 503",
    )
    parser.add_argument("--docs", action="store_true",
                        help="serve /docs and /openapi.json (off by default)")  # fmt: skip
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
    # torch's OpenMP threads busy-waiting between ops take the cores other work needs (the
    # embq CLI sets the same); set before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from embq_serving.protocol import guarded_protocol

    args = build_parser().parse_args(argv)
    for flag, value in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes),
                        ("--max-concurrency", args.max_concurrency),
                        ("--max-connections", args.max_connections)):  # fmt: skip
        if value < 1:
            print(f"embq-serve: error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    for flag, value in (("--head-timeout", args.head_timeout), ("--body-timeout", args.body_timeout),
                        ("--watch-interval", args.watch_interval)):  # fmt: skip
        if not value > 0:
            print(f"embq-serve: error: {flag} must be a positive number of seconds, got {value}",
                  file=sys.stderr)  # fmt: skip
            return 2
    if not os.path.isdir(args.model):
        print(f"embq-serve: error: {args.model} is not an artifact directory", file=sys.stderr)
        return 2
    # Our logger only: a root configuration would also print every library's INFO chatter.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False  # a root handler (set up by an imported library) would print it twice
    if args.host not in LOOPBACK:
        log.warning("embq-serve: binding %s exposes the model beyond this machine", args.host)
    limits = Limits(args.max_batch, args.max_body_bytes, args.body_timeout, args.max_concurrency)
    app = create_app(args.model, limits, args.threads, args.kernel, expect_digest=args.expect_digest,
                     docs=args.docs, watch_interval=args.watch_interval)  # fmt: skip
    # No uvicorn limit_concurrency: it counts open connections, so stalled clients made every
    # request answer 503, /healthz included. Connections are capped and timed out by the
    # protocol instead, and /predict work by the app (Limits.max_in_flight).
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        http=guarded_protocol(args.head_timeout, args.max_connections),
        timeout_graceful_shutdown=30,
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
        reason = getattr(app.state, "load_error", None) or "see the log above"
        print(f"embq-serve: error: could not start serving {args.model}: {reason}",
              file=sys.stderr)  # fmt: skip
        return STARTUP_FAILURE
    if stopped_by:
        log.info("embq-serve: stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
