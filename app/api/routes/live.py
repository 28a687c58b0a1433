"""WebSocket /ws/segment: live frames in (each binary message one JPEG), one PNG of the chosen view out per frame
segmented. While a frame is in the model, newer frames replace the one waiting: a slow model drops frames, never
queues them."""

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from ...core.errors import ServiceError
from ...serving.live import LatestFrame, segment_frame

router = APIRouter(tags=["live"])


@router.websocket("/ws/segment")
async def live(
    ws: WebSocket,
    view: Annotated[Literal["mask", "overlay", "labels"], Query()] = "mask",
    alpha: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
    model: Annotated[str | None, Query()] = None,
):
    """Per segmented frame the server sends a text message ``{"frame": n, "dropped": d, "timings_ms": {...}}``
    (n counts the binary messages received, from 0; d the frames replaced unseen so far) and then the PNG. A frame
    that cannot be segmented (not a usable image, a model that is not loaded) gets
    ``{"frame": n, "error": ..., "status": 4xx/5xx}`` and the stream goes on. ``model``: as ``?model=`` of
    POST /segment (default: the default model)."""
    state, streams = ws.app.state.service, ws.app.state.live_streams
    await ws.accept()
    with streams.admit() as ok:
        if not ok:
            await ws.close(1013, f"{streams.limit} live streams are open, the limit; try again later")
            return
        mailbox = LatestFrame()
        reader = asyncio.create_task(receive(ws, mailbox))
        try:
            while (item := await mailbox.get()) is not None:
                index, data = item
                try:  # the model is held in the worker thread, only while this frame is in it
                    png, timings = await state.run(segment_frame, state, model, data, view, alpha)
                except ServiceError as exc:
                    await ws.send_json({"frame": index, "error": exc.detail, "status": exc.status_code})
                    continue
                state.metrics.observe_stages(timings)
                await ws.send_json({"frame": index, "dropped": mailbox.dropped, "timings_ms": timings})
                await ws.send_bytes(png)
        except (WebSocketDisconnect, RuntimeError):  # the client left while we were sending
            pass
        finally:
            reader.cancel()


async def receive(ws: WebSocket, mailbox: LatestFrame) -> None:
    """Read every message as it comes (so nothing piles up in the socket) into the mailbox; close it at the end."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                mailbox.put(message["bytes"])
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        mailbox.close()
