"""Request-body limits enforced while the body streams in (ASGI middleware): size and time.

Content-Length is checked before reading; a body without one (chunked) is counted as it arrives and cut off
with 413 as soon as it passes the limit, so an upload is never received in full only to be refused. A body that
arrives too slowly (longer than ``timeout_s`` in all, or nothing for ``idle_timeout_s``) is cut off with 408, so a
client trickling bytes cannot hold a connection and its buffers open for ever.
"""

import asyncio
import json
import time

from .errors import error_key


class BodyLimitMiddleware:
    """413 for bodies over ``limit_for(path)`` bytes, by declared length or as they stream; 408 for bodies that take
    longer than ``timeout_s``, or pause longer than ``idle_timeout_s``."""

    def __init__(self, app, limit_for, timeout_s: float = 120.0, idle_timeout_s: float = 15.0):
        self.app, self.limit_for = app, limit_for
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        key = error_key(scope["path"])
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, key, 413,
                                      f"request body of {int(declared):,} bytes is over the {limit:,}-byte limit")
        deadline = time.monotonic() + self.timeout_s
        received, refusal, refused, body_done = 0, None, False, False

        async def guarded_receive():
            nonlocal received, refusal, body_done
            if refusal:
                return {"type": "http.disconnect"}
            if body_done:  # after the body only a disconnect can come: wait for it as long as the app likes
                return await receive()
            wait = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                message = None
            if message is None:
                # A body that arrived while this event loop was itself held up (a busy machine) is already here:
                # one short look before calling the client slow.
                try:
                    message = await asyncio.wait_for(receive(), 0.05)
                except asyncio.TimeoutError:
                    pass
            if message is None:
                # Stop reading here. The app sees a disconnect and gives up on the body; whatever it answers is
                # replaced by the refusal below.
                total = time.monotonic() >= deadline
                refusal = (408, f"request body not received within {self.timeout_s:g} s" if total else
                           f"request body stalled: nothing received for {self.idle_timeout_s:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refusal = (413, f"request body is over the {limit:,}-byte limit")
                    return {"type": "http.disconnect"}
            return message

        async def refuse_once():
            nonlocal refused
            if not refused:
                refused = True
                await self._refuse(send, key, *refusal)

        async def replacing_send(message):
            if not refusal:
                await send(message)
            elif message["type"] == "http.response.start":
                await refuse_once()

        try:
            await self.app(scope, guarded_receive, replacing_send)
        except Exception:
            if not refusal:
                raise
            await refuse_once()

    @staticmethod
    async def _refuse(send, key: str, status: int, detail: str) -> None:
        body = json.dumps({key: detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
