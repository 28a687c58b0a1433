"""GET /bench: measure the served model in place, bounded, one run at a time."""

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool

from ...serving import bench
from ..deps import AdminDep, ModelDep, StateDep

router = APIRouter(tags=["operations"])
# Every bound together keeps one run from holding the model for long: the whole run stops at `seconds` (at most 30),
# and the one step that may straddle that deadline feeds at most MAX_CALL_PIXELS.
MAX_SECONDS = 30.0
MAX_ITERATIONS = 2000
MAX_WARMUP = 100
MAX_BATCH = 64
MAX_IMAGES = 4096  # (warmup + iterations) x batch
MAX_CALL_PIXELS = 1 << 24  # batch x height x width in one runner call: 8 x 1024 x 2048


@router.get("/bench", dependencies=[AdminDep], responses={
    409: {"description": "A benchmark is already running"},
    422: {"description": "A parameter, the images of the whole run, or the pixels of one call beyond their bounds"}})
async def run_bench(
    model: ModelDep,
    state: StateDep,
    mode: Literal["engine", "e2e"] = "engine",
    iterations: Annotated[int, Query(ge=1, le=MAX_ITERATIONS)] = 50,
    seconds: Annotated[float, Query(gt=0, le=MAX_SECONDS,
                                    description="The whole run, warm-up included, stops after this long")] = 10.0,
    warmup: Annotated[int, Query(ge=0, le=MAX_WARMUP)] = 5,
    batch: Annotated[int, Query(ge=1, le=MAX_BATCH)] = 1,
    height: Annotated[int | None, Query(ge=32, le=4096, description="Input height (dynamic-H/W models)")] = None,
    width: Annotated[int | None, Query(ge=32, le=4096, description="Input width (dynamic-H/W models)")] = None,
) -> dict:
    """Throughput and latency percentiles of the served model: at most 30 s in all, 2000 iterations,
    (warmup + iterations) x batch of 4096 images, and batch x height x width of 16.8 M pixels a call.

    Concurrent requests keep being served: they take turns with the benchmark on the same runner.
    """
    if batch > 1 and not model.batch_dynamic:
        raise HTTPException(400, detail=f"{model.name} has a fixed batch of 1")
    if (images := (warmup + iterations) * batch) > MAX_IMAGES:
        raise HTTPException(422, detail=f"(warmup + iterations) x batch is {images:,} images; at most {MAX_IMAGES:,}")
    try:
        size = (height, width) if height and width else None
        cfg = bench.BenchConfig(mode=mode, iterations=iterations, deadline_s=seconds, warmup_iterations=warmup,
                                batch=batch, size=size)
        h, w = bench.fed_size(model, cfg)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    if (pixels := batch * h * w) > MAX_CALL_PIXELS:
        raise HTTPException(422, detail=f"one call of batch x height x width is {batch} x {h} x {w} = {pixels:,} "
                                        f"pixels; at most {MAX_CALL_PIXELS:,}")
    if not state.bench_lock.acquire(blocking=False):
        raise HTTPException(409, detail="a benchmark is already running; try again when it has finished")
    try:
        return await run_in_threadpool(bench.run, model, cfg)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    finally:
        state.bench_lock.release()
