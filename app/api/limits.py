"""A request-body size limit enforced while the body streams in (ASGI middleware).

Content-Length is checked before reading; a body without one (chunked) is counted as it arrives and cut off
with 413 as soon as it passes the limit, so an upload is never received in full only to be refused.
"""

import json


class BodyLimitMiddleware:
    """413 for bodies over ``limit_for(path)`` bytes, by declared length or as they stream."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        # The Open Inference Protocol's routes answer errors as {"error": ...}; the others as {"detail": ...}.
        key = "error" if scope["path"].startswith("/v2/") else "detail"
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, key, f"request body of {int(declared):,} bytes is over the {limit:,}-byte limit")
        received, exceeded, refused = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Stop reading here. The app sees a disconnect and gives up on the body; whatever it
                    # answers (FastAPI says 400) is replaced by the 413 below.
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def refuse_once():
            nonlocal refused
            if not refused:
                refused = True
                await self._refuse(send, key, f"request body is over the {limit:,}-byte limit")

        async def replacing_send(message):
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                await refuse_once()

        try:
            await self.app(scope, counting_receive, replacing_send)
        except Exception:
            if not exceeded:
                raise
            await refuse_once()

    @staticmethod
    async def _refuse(send, key: str, detail: str) -> None:
        body = json.dumps({key: detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
