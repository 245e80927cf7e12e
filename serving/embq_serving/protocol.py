"""uvicorn's h11 protocol with a deadline for request heads and a cap on open connections.

uvicorn 0.54 (h11) times out a connection only while it is idle after a response
(`timeout_keep_alive`): a client that connects and sends nothing, or half a request line and
headers, holds its connection forever. And its `limit_concurrency` counts open connections, so
64 such clients made every other request, /healthz included, answer 503.

`guarded_protocol(head_timeout, max_connections)` returns a subclass of uvicorn's H11Protocol
that closes a connection whose request head (request line and headers) is not complete within
`head_timeout` seconds of the connection opening or of the previous response, and closes new
connections at once while `max_connections` are open (so file descriptors stay bounded).
Requests are not limited here: the app limits /predict work and always answers /healthz
(`embq_serving.http`). The body has its own deadline in the app (`read_body`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("embq_serving.http")


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a request-head deadline and a connection cap (see the module docstring;
    set by `guarded_protocol`)."""

    head_timeout: float = 10.0
    max_connections: int = 512
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("embq-serve: %d connections open (--max-connections); closing a new one",
                        len(self.connections) - 1)  # fmt: skip
            transport.close()
            return
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting = self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )
        if waiting and not self.transport.is_closing():
            who = "{}:{}".format(*self.client) if self.client else "a client"
            log.info("embq-serve: %s sent no complete request head within %gs; closing its "
                     "connection", who, self.head_timeout)  # fmt: skip
            self.transport.close()


def guarded_protocol(head_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"head_timeout": float(head_timeout), "max_connections": int(max_connections)},
    )
