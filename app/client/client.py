"""The Python client of the service: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio), both on httpx.

>>> with Client("http://localhost:8000") as client:
...     labels = client.segment("street.jpg")            # class ids, a NumPy array [H, W]
...     mask = client.segment("street.jpg", view="mask", output="pil")
...     client.segment_files(["a.jpg", "b.jpg"])          # a.mask.png, b.mask.png beside them

Requests answered 502/503/504 (busy, no model yet), a 500 from a proxy in front (not the service's JSON) or not
answered at all are retried with exponential backoff, waiting the server's ``Retry-After`` where it says one;
refusals raise a :class:`~.errors.SegmentError` subclass with the server's ``detail``.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import httpx
from tqdm import tqdm

from .errors import ConnectionFailed, SegmentError
from .wire import (ImageInput, Output, View, check, mask_path, result, retry_delay, segment_params, upload,
                   worth_retrying)

Destination = Callable[[Path, View], Path]


class _Base:
    def __init__(self, url: str, *, model: str | None = None, token: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_delay: float = 30.0):
        """``model``: the model every call asks for unless it names one; ``token``: the admin token (sent as a
        bearer token); ``retries``: further attempts after a 502/503/504, a proxy's 500 or no answer."""
        self.url, self.model = url.rstrip("/"), model
        self.retries, self.backoff, self.max_delay = retries, backoff, max_delay
        self._options = {"base_url": self.url, "timeout": timeout,
                         "headers": {"Authorization": f"Bearer {token}"} if token else {}}

    def _next_delay(self, attempt: int, response, exc) -> float | None:
        """Seconds to wait before the next attempt, or None when this outcome is final."""
        if attempt >= self.retries:
            if exc is not None:
                raise ConnectionFailed(0, f"no answer from {self.url}: {exc}") from exc
            return None
        if exc is None and not worth_retrying(response):
            return None
        return retry_delay(response, attempt, self.backoff, self.max_delay)


class Client(_Base):
    """A blocking client; thread-safe (``segment_files`` runs several requests at once on it)."""

    def __init__(self, url: str, *, transport: httpx.BaseTransport | None = None, **options):
        super().__init__(url, **options)
        self._http = httpx.Client(transport=transport, **self._options)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, retried on 502/503/504, a proxy's 500 or no answer; the last response is returned whatever
        its status."""
        attempt = 0
        while True:
            response = exc = None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                exc = error
            delay = self._next_delay(attempt, response, exc)
            if delay is None:
                return response
            time.sleep(delay)
            attempt += 1

    def segment(self, image: ImageInput, *, view: View = "labels", model: str | None = None, alpha: float = 0.5,
                output: Output = "numpy"):
        """Segment one image (a path, encoded bytes, an RGB array or a PIL image): the ``view`` as a NumPy array
        (class ids [H,W] for labels, RGB [H,W,3] otherwise), a PIL image, or PNG bytes."""
        name, data = upload(image)
        model = model or self.model
        response = self.request("POST", "/segment", params=segment_params(view, alpha, model),
                                files={"image": (name, data)})
        return result(response, output, model)

    def segment_files(self, paths: Iterable[str | Path], *, view: View = "mask", model: str | None = None,
                      alpha: float = 0.5, concurrency: int = 4, progress: bool = True,
                      destination: Destination = mask_path) -> dict[Path, Path | SegmentError]:
        """Segment many files, ``concurrency`` at a time, with a progress bar; each PNG is written where
        ``destination`` says (``NAME.VIEW.png`` beside the input). Returns, per input, the file written or the
        error that file met (one bad file does not stop the others)."""
        paths = [Path(p) for p in paths]

        def one(path: Path) -> Path | SegmentError:
            try:
                png = self.segment(path, view=view, model=model, alpha=alpha, output="png")
            except SegmentError as exc:
                return exc
            target = destination(path, view)
            target.write_bytes(png)
            return target

        outcomes = {}
        with ThreadPoolExecutor(max(1, concurrency)) as pool, tqdm(total=len(paths), unit="img",
                                                                   disable=not progress) as bar:
            for path, outcome in zip(paths, pool.map(one, paths)):
                outcomes[path] = outcome
                bar.update()
        return outcomes

    def model_info(self) -> dict:
        """The default model: backend, device, input contract, classes and metadata."""
        return self.call("GET", "/models/active")

    def models(self) -> dict:
        """``GET /models``: every repository model, which are loaded, which is the default."""
        return self.call("GET", "/models")

    def load(self, name: str) -> dict:
        """Load a model in every worker (needs the admin ``token``)."""
        return self.call("POST", f"/models/{name}/load")

    def unload(self, name: str) -> dict:
        """Unload a model in every worker (needs the admin ``token``; the default cannot be unloaded)."""
        return self.call("POST", f"/models/{name}/unload")

    def call(self, method: str, path: str, **kwargs):
        """A JSON route: its answer, or the typed error."""
        response = self.request(method, path, **kwargs)
        check(response)
        return response.json()

    def ready(self) -> bool:
        """Whether the server has a model loaded (one attempt, no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Base):
    """The asyncio client, with the same calls as :class:`Client` as coroutines."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None, **options):
        super().__init__(url, **options)
        self._http = httpx.AsyncClient(transport=transport, **self._options)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        attempt = 0
        while True:
            response = exc = None
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                exc = error
            delay = self._next_delay(attempt, response, exc)
            if delay is None:
                return response
            await asyncio.sleep(delay)
            attempt += 1

    async def segment(self, image: ImageInput, *, view: View = "labels", model: str | None = None,
                      alpha: float = 0.5, output: Output = "numpy"):
        name, data = await asyncio.to_thread(upload, image)
        model = model or self.model
        response = await self.request("POST", "/segment", params=segment_params(view, alpha, model),
                                      files={"image": (name, data)})
        return result(response, output, model)

    async def segment_files(self, paths: Iterable[str | Path], *, view: View = "mask", model: str | None = None,
                            alpha: float = 0.5, concurrency: int = 4, progress: bool = True,
                            destination: Destination = mask_path) -> dict[Path, Path | SegmentError]:
        paths = [Path(p) for p in paths]
        gate = asyncio.Semaphore(max(1, concurrency))
        bar = tqdm(total=len(paths), unit="img", disable=not progress)

        async def one(path: Path) -> Path | SegmentError:
            async with gate:
                try:
                    png = await self.segment(path, view=view, model=model, alpha=alpha, output="png")
                except SegmentError as exc:
                    return exc
                finally:
                    bar.update()
            target = destination(path, view)
            await asyncio.to_thread(target.write_bytes, png)
            return target

        try:
            return dict(zip(paths, await asyncio.gather(*(one(p) for p in paths))))
        finally:
            bar.close()

    async def model_info(self) -> dict:
        return await self.call("GET", "/models/active")

    async def models(self) -> dict:
        return await self.call("GET", "/models")

    async def load(self, name: str) -> dict:
        return await self.call("POST", f"/models/{name}/load")

    async def unload(self, name: str) -> dict:
        return await self.call("POST", f"/models/{name}/unload")

    async def call(self, method: str, path: str, **kwargs):
        response = await self.request(method, path, **kwargs)
        check(response)
        return response.json()

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
