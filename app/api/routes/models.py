"""Model control: what is loaded where, and load, unload, default (admin). Every change goes to the control store,
which every worker follows (docs/control-plane.md)."""

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from ...serving.models import ModelSet
from ..deps import AdminDep, ModelsDep

router = APIRouter(prefix="/models", tags=["models"])


def memory(row: dict) -> dict | None:
    """What one worker's load of a model took: host RSS growth, GPU memory (None on the CPU or unknown)."""
    if row["state"] != "loaded":
        return None
    return {"host_rss_bytes": row["memory_bytes"], "device_bytes": row["device_bytes"]}


def total_memory(rows: list[dict]) -> dict | None:
    """The memory of a model summed over the workers that have it loaded (None when none has); ``device_bytes``
    None when none of them reports a GPU figure."""
    if not rows:
        return None
    device = [r["device_bytes"] for r in rows if r["device_bytes"] is not None]
    return {"host_rss_bytes": sum(r["memory_bytes"] or 0 for r in rows), "device_bytes": sum(device) if device else None}


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
            "memory": total_memory([w for w in rows if w["state"] == "loaded"]),
            "workers": {str(w["pid"]): {"state": w["state"], "error": w["error"], "memory": memory(w)} for w in rows},
            **({"engines": entry["engines"]} if "engines" in entry else {}),
        })
    return out


@router.get("")
def list_models(models: ModelsDep) -> dict:
    """Every model in the repository: kind, precision, input size, classes, whether it is the default, and its
    state (`loaded`, `unloaded`, `loading`, `failed` with the reason) with how many of the live workers have it
    loaded, the memory it took there (`memory`: `host_rss_bytes`, the RSS growth at load, and `device_bytes`, GPU
    memory, null on the CPU; summed over workers) and each worker's view with its own figures. `workers`: every
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
