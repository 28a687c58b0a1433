"""Ray Serve mode against the embedded server, side by side in one run, on the same model and photo.

    python benchmarks/ray_vs_embedded.py [--clients 1,4] [--seconds 10] [--rounds 2] [--model NAME]
    python benchmarks/ray_vs_embedded.py --gpu --jpeg --clients 32,64 --embedded-workers 16 --ingress-replicas 8 \
                                         --model-replicas 1 --batch-max 8 --models DIR --model camvid_fp16

Starts both at once on loopback: `segment serve` (``--embedded-workers`` processes) and `segment serve --ray` (a
local Ray: ``--ingress-replicas`` CPU ingress replicas, ``--model-replicas`` model replicas with all the CPUs
left, or ``--model-gpus`` of a GPU each with ``--gpu``; ``--haproxy`` puts Serve's HAProxy in front instead of its
Python proxy; ``--servers ray`` runs Ray alone; ``--layout fused`` runs ``--model-replicas`` replicas of the whole
app instead, each with its own runners, as the embedded server's workers; ``--servers embedded,actors,ray --alone``
adds a control without Serve: the embedded server's app in ``--model-replicas`` plain Ray actors,
`benchmarks/ray_actor_servers.py`). Then, in alternating rounds so that
other load on the machine hits both alike, ``clients`` concurrent clients upload the sample photo (2048x1024 PNG,
or a JPEG of it with ``--jpeg``) to each for ``seconds``. ``--alone`` instead starts, measures and stops one
server after the other (on a GPU the server started second got fewer of its JPEG engines). Prints images/s,
p50/p99 latency, the machine's CPU and GPU busy share, the mean batch in Ray mode, the Ray/embedded ratios, and
where Ray's extra time goes from the responses' Server-Timing: the model call through the deployment handle (Ray's
"inference" minus the embedded one) and the HTTP proxy hop plus the rest (the extra latency not inside the
ingress's stages).

``--gpu-decode`` decodes JPEGs of the model's size on the GPU in both servers (in Ray mode the ingress sends the
JPEG's bytes and the model replica decodes a batch at once); each server's labels for the photo are compared
with the first's. ``--profile DIR`` writes py-spy profiles of the busiest embedded worker, ingress,
model and fused replica: the threads at work, and the thread holding the GIL.
"""

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.resources import sample_image, seed_repository  # noqa: E402
from app.engines.host import cpu_name  # noqa: E402
from benchmarks.gpu_serving import Busy  # noqa: E402
from benchmarks.loadgen import post_load  # noqa: E402
from tests.server import free_port  # noqa: E402


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    start_t, deadline = time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start_t
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # `segment serve --ray` removes the app and stops its Ray on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Which part of Ray a process is, from its command line (Ray names its workers "ray::<actor>").
RAY_ROLES = (("SegmentIngress", "ingress replicas"), ("SegmentModel", "model replicas"),
             ("SegmentServer", "fused replicas"), ("AppServer", "app actors"),
             ("ProxyActor", "Serve proxy"), ("haproxy", "HAProxy"))
RAY_PROFILED = ("ingress replicas", "model replicas", "fused replicas", "app actors")
SPY_HZ = 200  # py-spy's samples a second


def cpu_by_process(sessions: dict[int, str]) -> dict[int, tuple[str, float]]:
    """Every process's role and CPU seconds so far (user + system). ``sessions``: the session id of each server
    (each starts in a session of its own, which its children share) and of this script (the load generator)."""
    tick, found = os.sysconf("SC_CLK_TCK"), {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        owner = sessions.get(int(fields[3]), "ray" if "ray" in cmd else "other")  # field 6 of stat: the session
        role = {"embedded": "embedded server", "bench": "load generator"}.get(owner, owner)
        if owner in ("ray", "actors"):
            role = next((name for key, name in RAY_ROLES if key in cmd), "Ray's own processes")
        found[int(proc.name)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return found


def cpu_ms_per_image(before: dict, after: dict, images: int) -> dict[str, float]:
    """CPU milliseconds per image each role spent between two ``cpu_by_process`` snapshots."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return {role: 1000 * s / max(1, images) for role, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s > 0.05}


def gpu_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return f", {pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}"
    except Exception:  # no NVIDIA driver or no pynvml: a CPU run
        return ""


def versions() -> str:
    import fastapi
    import onnxruntime
    import ray

    return f"ray {ray.__version__}, onnxruntime {onnxruntime.__version__}, fastapi {fastapi.__version__}"


def spied(seconds: float) -> int:
    """Seconds a profile records of a load point of ``seconds`` (one less: it starts with the load)."""
    return max(1, int(seconds) - 1)


def profile(processes: dict, roles: tuple, seconds: float, out: Path, native: bool = False) -> list[subprocess.Popen]:
    """py-spy recording, for ``seconds``, the busiest process so far of each of ``roles`` (``cpu_by_process``: an
    embedded worker rather than its supervisor): one profile of the threads at work (``<role>.txt``) and one of
    the thread holding the GIL (``<role>-gil.txt``), raw collapsed stacks, the process never paused. ``native``:
    the threads at work with their C frames too (``<role>-native.txt``, at a quarter of the rate: py-spy pauses
    the process for each of those samples)."""
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        print("no py-spy here (pip install py-spy): no profiles", flush=True)
        return []
    spies = []
    for role in roles:
        found = [(seconds_so_far, pid) for pid, (r, seconds_so_far) in processes.items() if r == role]
        if not found:
            continue
        pid, name = max(found)[1], role.split()[0]
        # --idle for the GIL: a thread may hold it while it sleeps (in a blocking wait for the GPU)
        kinds = [("", ["--rate", str(SPY_HZ), "--nonblocking"]),
                 ("-gil", ["--rate", str(SPY_HZ), "--nonblocking", "--gil", "--idle"])]
        if native:  # what a thread inside ONNX Runtime or CUDA does: spin, yield or sleep
            kinds.append(("-native", ["--rate", str(SPY_HZ // 4), "--native"]))
        for suffix, extra in kinds:
            with open(out / f"{name}{suffix}.log", "wb") as log:  # the child keeps its own copy of the handle
                spies.append(subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--duration", str(spied(seconds)), "--format", "raw",
                     "--threads", *extra, "--output", str(out / f"{name}{suffix}.txt")],
                    stdout=subprocess.DEVNULL, stderr=log))
    return spies


def print_profiles(out: Path, seconds: float, top: int = 10) -> None:
    """Each profile's busiest frames: by samples in the frame itself, and by samples under each of the service's
    own functions (``app/``); for a GIL profile, also the share of the time some thread held the GIL."""
    for path in sorted(out.glob("*.txt")):
        own, under, total = {}, {}, 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [f for f in stack.split(";")[1:]]  # the first is the thread
            if not frames or not count.isdigit():
                continue
            total += int(count)
            own[frames[-1]] = own.get(frames[-1], 0) + int(count)
            for frame in set(f for f in frames if "app/" in f):
                under[frame] = under.get(frame, 0) + int(count)
        held = (f", the GIL held {100 * total / (SPY_HZ * spied(seconds)):.0f}% of the time"
                if path.stem.endswith("-gil") else "")
        hz = SPY_HZ // 4 if path.stem.endswith("-native") else SPY_HZ
        print(f"\npy-spy, {path.stem}: {total} samples at {hz} Hz{held}; most in the frame itself:")
        for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {100 * n / total:5.1f}%  {frame}")
        print("  under the service's own functions:")
        for frame, n in sorted(under.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {100 * n / total:5.1f}%  {frame}")


def labels_of(name: str, url: str, photo: bytes, kind: tuple) -> np.ndarray:
    """The server's labels for the photo (its stages printed): every server runs one model, so the answers must
    match whatever path (CPU or GPU decode, batched or not) each took."""
    r = httpx.post(f"{url}/segment", params={"view": "labels"}, files={"image": (*kind[:1], photo, kind[1])},
                   timeout=120)
    r.raise_for_status()
    print(f"{name}: Server-Timing {r.headers.get('server-timing')}", flush=True)
    return cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)


def leave(*_) -> None:
    """SIGTERM: leave through ``main``'s finally, which stops the servers; a second SIGTERM (``timeout`` and the
    shell may both send one) must not cut that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", type=Path, help="model repository (default: the bundled models)")
    ap.add_argument("--model", default="camvid_bisenetv2")
    ap.add_argument("--jpeg", action="store_true", help="upload the photo as JPEG (quality 95) instead of PNG")
    ap.add_argument("--gpu", action="store_true", help="model replicas on the GPU (SEGMENT_RAY_MODEL_GPUS)")
    ap.add_argument("--model-gpus", type=float, default=1.0,
                    help="with --gpu: GPUs per model replica (0.5: two replicas share one GPU)")
    ap.add_argument("--servers", default="embedded,ray",
                    help="which to run, in this order: embedded, ray, actors (the app in plain Ray actors, no Serve)")
    ap.add_argument("--alone", action="store_true",
                    help="start, measure and stop each server in turn, instead of both up at once with rounds "
                         "alternating: servers sharing a GPU contend for its JPEG engines (docs/ray.md)")
    ap.add_argument("--warm-seconds", type=float, default=0,
                    help="untimed load at the first client count before a server's first point: a server just "
                         "started is still allocating (GPU decoders, ONNX Runtime's arenas) under its first load")
    ap.add_argument("--haproxy", action="store_true",
                    help="Ray Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1) instead of its Python HTTP proxy")
    ap.add_argument("--embedded-workers", type=int, default=1)
    ap.add_argument("--ingress-replicas", type=int, default=1)
    ap.add_argument("--model-replicas", type=int, default=1)
    ap.add_argument("--batch-max", type=int, default=1, help="the Ray model replicas' batch")
    ap.add_argument("--embedded-batch-max", type=int, default=1,
                    help="the embedded server's (1: on CUDA, batching does not pay there, docs/gpu.md)")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--layout", choices=("split", "fused"), default="split",
                    help="Ray's layout (SEGMENT_RAY_LAYOUT): fused runs --model-replicas replicas of the whole app, "
                         "each with --model-gpus and an equal share of the cores (--ingress-replicas unused)")
    ap.add_argument("--gpu-decode", action="store_true",
                    help="SEGMENT_GPU_DECODE=1 for both servers: JPEGs of the model's size decoded on the GPU (in Ray "
                         "mode by the model replica, in batches)")
    ap.add_argument("--profile", type=Path,
                    help="write py-spy profiles (raw collapsed stacks: threads at work, and the GIL's holder) of the "
                         "busiest embedded worker, ingress, model and fused replica during each server's first load "
                         "point into this folder")
    ap.add_argument("--profile-native", action="store_true",
                    help="with --profile, also a profile with C frames (py-spy --native; pauses the process for "
                         "each sample)")
    args = ap.parse_args()
    # `timeout` ends a run with SIGTERM. The servers run in sessions of their own, so only the finally below stops
    # them: a Ray left running holds its ports (HAProxy's 8404 and 9101) and fails the next run.
    signal.signal(signal.SIGTERM, leave)

    tmp = Path(tempfile.mkdtemp(prefix="rvb"))
    engines = args.models or tmp / "engines"
    seed_repository(engines)
    photo = sample_image().read_bytes()
    if args.jpeg:
        photo = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR),
                             [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    kind = ("photo.jpg", "image/jpeg") if args.jpeg else ("photo.png", "image/png")
    cores = os.cpu_count() or 1
    base = {**os.environ, "SEGMENT_ENGINES_DIR": str(engines), "SEGMENT_MODEL": args.model,
            "SEGMENT_BATCH_MAX": str(args.embedded_batch_max), "SEGMENT_BATCH_WAIT_MS": str(args.batch_wait_ms),
            "SEGMENT_LOG_LEVEL": "warning", "XDG_CACHE_HOME": str(tmp / "cache"),
            "SEGMENT_GPU_DECODE": "1" if args.gpu_decode else "0"}
    # Ray: everything on loopback, its files in the temp folder, no token file in ~/.ray.
    ingress_cpus = 1.0 if args.gpu else 0.0  # on CPU the model replicas get every core, as the embedded server has
    if args.layout == "fused":
        args.ingress_replicas, ingress_cpus = 1, 0.0  # no ingress deployment: the replicas share every core
    ray_env = {**base, "SEGMENT_BATCH_MAX": str(args.batch_max), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "SEGMENT_RAY_INGRESS_REPLICAS": str(args.ingress_replicas), "SEGMENT_RAY_INGRESS_CPUS": str(ingress_cpus),
               "SEGMENT_RAY_MIN_REPLICAS": str(args.model_replicas), "SEGMENT_RAY_MAX_REPLICAS": str(args.model_replicas),
               "SEGMENT_RAY_MODEL_GPUS": str(args.model_gpus) if args.gpu else "0",
               "SEGMENT_RAY_MODEL_CPUS": str(max(1, (cores - args.ingress_replicas * ingress_cpus) // args.model_replicas)),
               "SEGMENT_RAY_LAYOUT": args.layout}
    if args.haproxy:
        ray_env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    serve = ["-m", "app.cli", "serve"]
    servers = {"embedded": ([*serve, "--workers", str(args.embedded_workers)], base),
               "ray": ([*serve, "--ray"], ray_env),
               "actors": ([str(ROOT / "benchmarks" / "ray_actor_servers.py"), "--actors", str(args.model_replicas),
                           "--gpus", str(args.model_gpus) if args.gpu else "0"],
                          {**base, **{k: v for k, v in ray_env.items() if k.startswith("RAY_")}})}
    servers = {name: servers[name] for name in args.servers.split(",")}
    if {"ray", "actors"} <= set(servers) and not args.alone:
        ap.error("--servers with both ray and actors needs --alone: each starts a Ray of its own")
    procs, urls, answers, results = {}, {}, {}, {}
    profiled: set[str] = set()
    print(f"machine: {cpu_name()}, {cores} cores{gpu_name()}; {versions()}; model {args.model}; "
          f"photo {len(photo) // 1024} KiB {kind[1]}", flush=True)
    try:
        for group in ([name] for name in servers) if args.alone else [list(servers)]:
            for name in group:
                (extra, env), port, log = servers[name], free_port(), tmp / f"{name}.log"
                urls[name] = f"http://127.0.0.1:{port}"
                procs[name] = start([*extra, "--host", "127.0.0.1", "--port", str(port)], env, log)
                print(f"{name}: start to ready {wait_ready(urls[name], procs[name], log):.1f} s", flush=True)
            sessions = {procs[name].pid: name for name in group} | {os.getsid(0): "bench"}
            if args.haproxy and "ray" in group:
                roles = [role for role, _ in cpu_by_process(sessions).values()]
                print(f"HAProxy processes: {roles.count('HAProxy')}", flush=True)
            for name in group:  # warm (first requests load caches), then the labels compared below
                for _ in range(3):
                    httpx.post(f"{urls[name]}/segment", files={"image": (*kind[:1], photo, kind[1])}, timeout=120)
                answers[name] = labels_of(name, urls[name], photo, kind)
                if args.warm_seconds:
                    post_load(urls[name], photo, kind[0], kind[1], int(args.clients.split(",")[0]),
                              args.warm_seconds, processes=4)
            for _ in range(args.rounds):
                for clients in map(int, args.clients.split(",")):
                    for name in group:
                        load0, cpu0 = os.getloadavg()[0], cpu_by_process(sessions)
                        spies = []
                        if args.profile and name not in profiled:  # each server's first point
                            profiled.add(name)
                            roles = ("embedded server",) if name == "embedded" else RAY_PROFILED
                            spies = profile(cpu0, roles, args.seconds, args.profile, args.profile_native)
                        with Busy() as busy:
                            r = post_load(urls[name], photo, kind[0], kind[1], clients, args.seconds,
                                          processes=min(clients, 4))
                        for spy in spies:
                            try:
                                spy.wait(timeout=60)
                            except subprocess.TimeoutExpired:  # a stuck profiler costs its profile, not the run
                                spy.kill()
                        r["load"], r["cpu"], r["gpu"] = load0, busy.cpu_pct, busy.gpu_pct
                        # over the whole call (start-up of the clients included), per image finished in the window
                        r["cpu_ms"] = cpu_ms_per_image(cpu0, cpu_by_process(sessions), r["n"])
                        results.setdefault((clients, name), []).append(r)
            if args.alone:
                for name in group:
                    stop(procs[name])
        first, *rest = answers
        for name in rest:
            print(f"labels of {name} equal to {first}'s on {(answers[name] == answers[first]).mean():.4%} of pixels",
                  flush=True)
        print(f"\n{'clients':>7} {'server':>9} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'n':>5} {'errors':>6} "
              f"{'load1':>5} {'cpu%':>5} {'gpu%':>5}  stages (ms, server-side means)")
        summary = {}
        for (clients, name), runs in sorted(results.items()):
            best = max(runs, key=lambda r: r["img_s"])  # rounds differ by the machine's other load: keep the best
            summary[(clients, name)] = best
            stages = ", ".join(f"{k} {v:.1f}" for k, v in best["stages"].items())
            if best["batch"] is not None:
                stages += f"; model batch {best['batch']:.1f} images"
            print(f"{clients:>7} {name:>9} {best['img_s']:>7.2f} {best['p50']:>8.1f} {best['p99']:>8.1f} "
                  f"{best['n']:>5} {len(best['errors']):>6} {best['load']:>5.1f} {best['cpu']:>5.0f} {best['gpu']:>5.0f}  "
                  f"{stages}", flush=True)
            if best["errors"]:  # HTTP statuses, or the exception a client got
                print(f"{'':>17} errors: {dict(Counter(map(str, best['errors'])).most_common())}", flush=True)
        print("\nCPU ms per image, by process (the whole machine, over each best run):")
        for (clients, name), best in sorted(summary.items()):
            print(f"{clients:>7} {name:>9}  total {sum(best['cpu_ms'].values()):.1f}: "
                  + ", ".join(f"{role} {ms:.1f}" for role, ms in best["cpu_ms"].items()))
        print()
        for clients, name in itertools.product(map(int, args.clients.split(",")), servers):
            if name == "embedded" or "embedded" not in servers:
                continue
            ray_r, emb = summary[(clients, name)], summary[(clients, "embedded")]
            extra = ray_r["p50"] - emb["p50"]
            hop = ray_r["stages"].get("inference", 0) - emb["stages"].get("inference", 0)
            inside = sum(ray_r["stages"].values()) - sum(emb["stages"].values())
            print(f"{clients} client(s): {name}/embedded throughput {ray_r['img_s'] / emb['img_s']:.2f}x, p50 latency "
                  f"{ray_r['p50'] / emb['p50']:.2f}x (+{extra:.1f} ms): the model call through the handle "
                  f"+{hop:.1f} ms, the proxy hop and the rest +{extra - inside:.1f} ms")
        if args.profile:
            print_profiles(args.profile, args.seconds)
        print("\nraw:", json.dumps({f"{c}:{n}": {k: v for k, v in r.items() if k != "errors"}
                                     for (c, n), r in summary.items()}))
    except Exception:
        for name in procs:
            print(f"--- {name} server log (tail) ---\n{(tmp / f'{name}.log').read_text()[-3000:]}", file=sys.stderr)
        for replica_log in sorted(tmp.glob("**/logs/serve/replica_*.log")):
            print(f"--- {replica_log.name} (tail) ---\n{replica_log.read_text()[-1500:]}", file=sys.stderr)
        raise
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
