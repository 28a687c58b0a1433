"""Model control: what is loaded where, and load, unload, default (admin). Every change goes to the control store,
which every worker follows (docs/control-plane.md)."""

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from ...serving.models import ModelSet
from ..deps import AdminDep, ModelsDep

router = APIRouter(prefix="/models", tags=["models"])


def overview(models: ModelSet, names: list[str] | None = None) -> list[dict]:
    """Every model of the repository (or ``names``) with its state across the live workers."""
    desired, workers = models.store.desired(), models.store.workers()
    pids = sorted({w["pid"] for w in workers})
    workers = [w for w in workers if w["model"]]
    out = []
    for entry in models.repository.list():
        name = entry["name"]
        if names is not None and name not in names:
            continue
        rows = [w for w in workers if w["model"] == name]
        states = {w["state"] for w in rows}
        state = next((s for s in ("failed", "loading", "loaded") if s in states), "unloaded")
        meta = entry["metadata"] or {}
        out.append({
            "name": name, "kind": "onnx" if entry["kind"] == "onnx" else "tensorrt engine",
            "precision": entry["precision"], "input_size": meta.get("input_size"),
            "classes": meta.get("class_names"), "default": name == desired.default, "wanted": name in desired.loaded,
            "state": state, "reason": next((w["error"] for w in rows if w["state"] == "failed"), None),
            "workers_loaded": sum(w["state"] == "loaded" for w in rows), "workers_total": len(pids),
            "memory_bytes": sum(w["memory_bytes"] or 0 for w in rows if w["state"] == "loaded"),
            "workers": {str(w["pid"]): {k: w[k] for k in ("state", "error", "memory_bytes")} for w in rows},
            **({"engines": entry["engines"]} if "engines" in entry else {}),
        })
    return out


@router.get("")
def list_models(models: ModelsDep) -> dict:
    """Every model in the repository: kind, precision, input size, classes, whether it is the default, and its
    state (`loaded`, `unloaded`, `loading`, `failed` with the reason) with how many of the live workers have it
    loaded, the host memory it took there (RSS growth at load, summed) and each worker's view. `workers`: every
    live worker with the store generation it has applied and the default it serves (a worker behind the store's
    `generation` is still catching up)."""
    workers = {}
    for row in models.store.workers():
        workers[str(row["pid"])] = {"generation": row["generation"], "default": row["serving"], "host": row["host"]}
    return {"default": models.store.desired().default, "generation": models.store.generation(),
            "worker": models.pid, "loaded_here": models.loaded(), "workers": workers, "models": overview(models)}


@router.post("/{name}/load", dependencies=[AdminDep])
async def load(name: str, models: ModelsDep) -> dict:
    """Load `name` in every worker (this one first: a model that cannot load is refused with its reason)."""
    await run_in_threadpool(models.load, name)
    return {"loaded": name, "models": overview(models, [name])}


@router.post("/{name}/unload", dependencies=[AdminDep], responses={409: {"description": "The default model"}})
async def unload(name: str, models: ModelsDep) -> dict:
    """Unload `name` in every worker; requests in flight on it finish first. The default cannot be unloaded."""
    await run_in_threadpool(models.unload, name)
    return {"unloaded": name}


@router.post("/{name}/default", dependencies=[AdminDep])
async def make_default(name: str, models: ModelsDep) -> dict:
    """Serve `name` when a request names no model, in every worker (loaded first where it is not)."""
    model = await run_in_threadpool(models.make_default, name)
    return {"default": name, "active": model.describe()}
