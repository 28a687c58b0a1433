"""GET /bench: measure the served model in place, bounded, one run at a time."""

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool

from ...serving import bench
from ..deps import AdminDep, ModelDep, StateDep

router = APIRouter(tags=["operations"])
MAX_SECONDS = 30.0
MAX_ITERATIONS = 2000


@router.get("/bench", dependencies=[AdminDep], responses={409: {"description": "A benchmark is already running"}})
async def run_bench(
    model: ModelDep,
    state: StateDep,
    mode: Literal["engine", "e2e"] = "engine",
    iterations: Annotated[int, Query(ge=1, le=MAX_ITERATIONS)] = 50,
    seconds: Annotated[float, Query(gt=0, le=MAX_SECONDS, description="Timing stops after this long")] = 10.0,
    warmup: Annotated[int, Query(ge=0, le=100)] = 5,
    batch: Annotated[int, Query(ge=1, le=64)] = 1,
    height: Annotated[int | None, Query(ge=32, le=4096, description="Input height (dynamic-H/W models)")] = None,
    width: Annotated[int | None, Query(ge=32, le=4096, description="Input width (dynamic-H/W models)")] = None,
) -> dict:
    """Throughput and latency percentiles of the served model (capped at 30 s of timing and 2000 iterations).

    Concurrent requests keep being served: they take turns with the benchmark on the same runner.
    """
    if batch > 1 and not model.batch_dynamic:
        raise HTTPException(400, detail=f"{model.name} has a fixed batch of 1")
    if not state.bench_lock.acquire(blocking=False):
        raise HTTPException(409, detail="a benchmark is already running; try again when it has finished")
    try:
        size = (height, width) if height and width else None
        cfg = bench.BenchConfig(mode=mode, iterations=iterations, seconds=seconds, warmup_iterations=warmup,
                                batch=batch, size=size)
        return await run_in_threadpool(bench.run, model, cfg)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    finally:
        state.bench_lock.release()
