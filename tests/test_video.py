"""Video jobs through the API, bad videos, the queue limit, cancellation, retention and restart recovery; the CLI on
videos. Clips are made here (tests/videos.py); the RGB-argmax model's right answer is known exactly."""

import csv
import io
import json
import re
import signal
import subprocess
import sys
import time
import zipfile

import av
import numpy as np
import pytest

from app.serving import nvdec

from .models import ROOT, decode_png, make_client, rgb_model
from .server import Server
from .videos import colour_frames, quadrant_frames, scene_frames, write_clip

COLOURS = [0, 1, 2, 2, 1, 0, 0, 1]  # one class per frame: 0 red, 1 green, 2 blue
ON = "cpu" if nvdec.problem() else "nvdec"  # the decoder video_decode=auto picks on this machine


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    rgb_model(root / "engines" / "rgb.onnx", height="H", width="W")
    return root


@pytest.fixture(scope="module")
def clips(repo):
    """The clips the tests send, made once."""
    return {"colours": write_clip(repo / "colours.mp4", colour_frames(COLOURS), fps=10),
            "long": write_clip(repo / "long.mp4", quadrant_frames(2400, 48, 64), fps=30),
            "webm": write_clip(repo / "colours.webm", colour_frames(COLOURS), fps=10, codec="libvpx-vp9"),
            "avi": write_clip(repo / "colours.avi", colour_frames(COLOURS), fps=10, codec="mpeg4")}


@pytest.fixture(scope="module")
def client(repo):
    with make_client(repo / "engines", "rgb", results_dir=repo / "results", video_queue=1, results_keep=3,
                     max_video_frames=3000) as c:
        yield c


def post(client, path, name="clip.mp4", query=""):
    data = path if isinstance(path, bytes) else path.read_bytes()
    return client.post(f"/segment/video{query}", files={"video": (name, data, "video/mp4")})


def wait(client, url, states=("done", "failed"), until=lambda s: True, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(url).json()
        if status["state"] in states and until(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job did not reach {states}: {status}")


def test_video_job_writes_overlay_stats_and_labels(client, clips):
    r = post(client, clips["colours"], query="?labels=true&alpha=0.5")
    assert r.status_code == 202
    body = r.json()
    assert body["status_url"] == f"/segment/video/{body['job_id']}"
    status = wait(client, body["status_url"])
    assert status["state"] == "done", status
    assert status["frames_done"] == status["frames_total"] == len(COLOURS)
    assert status["fps"] > 0 and status["error"] is None and status["model"] == "rgb"
    assert status["decoder"] == f"h264 ({ON})"

    stats = client.get(status["stats_url"]).json()
    assert (stats["width"], stats["height"], stats["fps"]) == (96, 64, 10.0)
    assert [f["index"] for f in stats["frames"]] == list(range(len(COLOURS)))
    assert [f["time_s"] for f in stats["frames"]] == pytest.approx([i / 10 for i in range(len(COLOURS))])
    names = ["red", "green", "blue"]
    for colour, frame in zip(COLOURS, stats["frames"]):
        assert frame["classes"] == {n: (1.0 if i == colour else 0.0) for i, n in enumerate(names)}

    r = client.get(status["stats_url"], params={"format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [float(row[names[c]]) for row, c in zip(rows, COLOURS)] == [1.0] * len(COLOURS)
    assert list(rows[0]) == ["index", "time_s", *names]

    # The overlay video: H.264 in MP4, same size, rate and frame count; each frame the photo blended with its class
    r = client.get(status["video_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as video:
        stream = video.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 96, 64)
        assert stream.average_rate == 10
        frames = [f.to_ndarray(format="bgr24") for f in video.decode(stream)]
    assert len(frames) == len(COLOURS)
    palette_bgr = np.array([[10, 10, 200], [10, 200, 10], [200, 10, 10]])
    for colour, frame, photo in zip(COLOURS, frames, colour_frames(COLOURS)):
        expected = 0.5 * photo[0, 0] + 0.5 * palette_bgr[colour]
        assert np.abs(frame[32, 48].astype(float) - expected).max() < 12  # lossy H.264 on a flat colour

    # The class ids of every frame, lossless
    r = client.get(status["labels_url"])
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.namelist() == [f"frame_{i:06d}.png" for i in range(len(COLOURS))]
        for colour, name in zip(COLOURS, archive.namelist()):
            labels = decode_png(archive.read(name))
            assert labels.shape == (64, 96) and (labels == colour).all()


@pytest.mark.parametrize("kind", ["webm", "avi"])
def test_other_containers_are_read(client, clips, kind):
    body = post(client, clips[kind], name=f"clip.{kind}").json()
    status = wait(client, body["status_url"])
    assert status["state"] == "done" and status["frames_done"] == len(COLOURS)
    assert status["source"]["codec"] == {"webm": "vp9", "avi": "mpeg4"}[kind]
    assert "labels_url" not in status  # not asked for
    assert client.get(f"{body['status_url']}/labels").status_code == 404


def test_bad_videos_are_refused_in_plain_words(repo, clips, tmp_path):
    good = clips["colours"].read_bytes()
    with av.open(str(tmp_path / "faststart.mp4"), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in scene_frames(12, 64, 96):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode(None))
    faststart = (tmp_path / "faststart.mp4").read_bytes()
    with av.open(str(tmp_path / "empty.mkv"), "w") as out:  # a video stream, and not one frame
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    raw = write_clip(tmp_path / "raw.mkv", colour_frames([0, 1]), codec="rawvideo").read_bytes()
    unknown_codec = raw.replace(b"V_UNCOMPRESSED", b"V_NOSUCHCODEC!")  # a codec id FFmpeg has no decoder for
    assert unknown_codec != raw
    cases = [
        (b"just some text, not a video", 415, "not a video"),
        (b"", 400, "empty"),
        (faststart[: len(faststart) * 3 // 4], 400, "truncated"),
        (good[: len(good) // 2], 400, "damaged or truncated"),
        ((tmp_path / "empty.mkv").read_bytes(), 400, "no frames"),
        (unknown_codec, 415, "unsupported video codec"),
        (write_clip(tmp_path / "big.mp4", colour_frames([0], 96, 128)).read_bytes(), 413, "pixels"),
        (write_clip(tmp_path / "many.mp4", colour_frames([0] * 6)).read_bytes(), 413, "frames; the limit is 5"),
        (b"\0" * 300_000, 413, "limit"),
    ]
    with make_client(repo / "engines", "rgb", results_dir=tmp_path / "results", max_video_frames=5,
                     max_pixels=96 * 64, max_video_bytes=200_000) as c:
        for data, code, words in cases:
            r = post(c, data)
            assert (r.status_code, words in r.json()["detail"]) == (code, True), (words, r.json())
        assert c.get("/healthz").status_code == 200  # the server is still up
        assert not [p for p in (tmp_path / "results").iterdir() if p.name != "owners"]  # refused uploads leave nothing


def test_queue_limit_cancel_and_delete(client, clips, repo):
    first = post(client, clips["long"]).json()
    wait(client, first["status_url"], states=("running",), until=lambda s: s["frames_done"] > 0)
    busy = post(client, clips["colours"])
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0
    assert "retry" in busy.json()["detail"]

    assert client.delete(first["status_url"]).status_code == 204  # cancels the running job
    assert client.get(first["status_url"]).status_code == 404
    assert not (repo / "results" / first["job_id"]).exists()
    assert client.delete(first["status_url"]).status_code == 404
    assert client.get("/segment/video/not-a-job").status_code == 404
    assert post(client, clips["colours"], query="?model=nosuch").status_code == 404

    deadline = time.time() + 60  # the worker lets go of the cancelled job at its next frame
    while (r := post(client, clips["colours"])).status_code == 503 and time.time() < deadline:
        time.sleep(0.05)
    assert r.status_code == 202
    assert wait(client, r.json()["status_url"])["state"] == "done"


def test_retention_keeps_the_newest_jobs(client, clips, repo):
    urls = []
    for _ in range(4):
        urls.append(post(client, clips["colours"]).json()["status_url"])
        assert wait(client, urls[-1])["state"] == "done"
    assert client.get(urls[0]).status_code == 404  # results_keep=3
    assert [client.get(u).status_code for u in urls[1:]] == [200, 200, 200]
    assert len([p for p in (repo / "results").iterdir() if (p / "job.json").exists()]) == 3


def make_old(results, job, hours=25):
    """Move a finished job's time back, in the record the service reads."""
    record = results / job["job_id"] / "job.json"
    data = json.loads(record.read_text())
    data["finished"] -= hours * 3600
    record.write_text(json.dumps(data))


def test_retention_by_age_on_submit_and_on_a_timer(repo, clips, tmp_path):
    results = tmp_path / "results"
    # 0.02 h = 72 s kept, swept every 7.2 s; results_keep is far off, so only age removes anything here
    with make_client(repo / "engines", "rgb", results_dir=results, video_queue=1, results_keep=50,
                     results_max_age_h=0.02) as c:
        jobs = []
        for _ in range(3):
            jobs.append(post(c, clips["colours"]).json())
            assert wait(c, jobs[-1]["status_url"])["state"] == "done"
        make_old(results, jobs[0])
        jobs.append(post(c, clips["colours"]).json())  # a submit sweeps, in a thread (so does the end of a job)
        deadline = time.time() + 30
        while (r := c.get(jobs[0]["status_url"])).status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        assert r.status_code == 404 and f"no video job {jobs[0]['job_id']}" in r.json()["detail"]
        assert c.get(jobs[0]["status_url"] + "/video").status_code == 404
        assert not (results / jobs[0]["job_id"]).exists()
        assert [c.get(j["status_url"]).status_code for j in jobs[1:]] == [200, 200, 200]  # the young stay
        assert wait(c, jobs[3]["status_url"])["state"] == "done"

        time.sleep(1.0)  # the worker's own sweep after job 3 is over, so only the timer can remove job 1 now
        make_old(results, jobs[1])  # and with no request at all, the timer sweeps
        deadline = time.time() + 60
        while (results / jobs[1]["job_id"]).exists() and time.time() < deadline:
            time.sleep(0.1)
        assert c.get(jobs[1]["status_url"]).status_code == 404
        assert [c.get(j["status_url"]).status_code for j in jobs[2:]] == [200, 200]


@pytest.mark.skipif(ON == "nvdec", reason="NVDEC works here")
def test_decode_auto_falls_back_to_the_cpu_and_cuda_refuses_to_start(repo, clips, tmp_path, caplog):
    with caplog.at_level("INFO", logger="segment.video"):
        with make_client(repo / "engines", "rgb", results_dir=tmp_path / "results", video_decode="auto") as c:
            status = wait(c, post(c, clips["webm"], name="clip.webm").json()["status_url"])
    assert status["state"] == "done" and status["decoder"] == "vp9 (cpu)"
    assert f"video jobs decode on the CPU: {nvdec.problem()}" in caplog.text  # says why, once
    with pytest.raises(RuntimeError, match=re.escape(f"SEGMENT_VIDEO_DECODE=cuda, but {nvdec.problem()}")):
        with make_client(repo / "engines", "rgb", results_dir=tmp_path / "results", video_decode="cuda"):
            pass
    with make_client(repo / "engines", "rgb", results_dir=tmp_path / "results", video_decode="cpu") as c:
        status = wait(c, post(c, clips["colours"]).json()["status_url"])
    assert status["decoder"] == "h264 (cpu)"


def test_a_restart_marks_unfinished_jobs_failed(repo, clips, tmp_path):
    env = {"SEGMENT_RESULTS_DIR": str(tmp_path / "results")}
    server = Server(repo / "engines", env=env)
    try:
        import httpx

        r = httpx.post(f"{server.url}/segment/video", files={"video": ("long.mp4", clips["long"].read_bytes())})
        assert r.status_code == 202
        url = server.url + r.json()["status_url"]
        deadline = time.time() + 60
        while httpx.get(url).json()["frames_done"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(url).json()["state"] == "running"
    finally:
        server.proc.kill()  # no shutdown: the job is cut short
        server.proc.wait()
    server = Server(repo / "engines", env=env)
    try:
        status = httpx.get(url.replace(url.split("/segment")[0], server.url)).json()
        assert status["state"] == "failed" and "restarted" in status["error"]
        assert status["frames_done"] > 0 and "video_url" not in status
    finally:
        server.stop()


def test_cli_video_with_stats_and_labels(repo, clips, tmp_path, capsys):
    from app.cli import main

    model, out = repo / "engines" / "rgb.onnx", tmp_path / "overlay.mp4"
    assert main(["run", str(model), str(clips["colours"]), str(out), "--stats", str(tmp_path / "s.csv"),
                 "--labels", str(tmp_path / "l.zip")]) == 0
    err = capsys.readouterr().err
    assert "frame" in err and f"{len(COLOURS)}/{len(COLOURS)}" in err  # tqdm: frames of the total
    assert f"decoding with h264 ({ON})" in err
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [max(("red", "green", "blue"), key=lambda n: float(row[n])) for row in rows] == [
        ["red", "green", "blue"][c] for c in COLOURS]
    with av.open(str(out)) as video:
        assert sum(1 for _ in video.decode(video=0)) == len(COLOURS)
    with zipfile.ZipFile(tmp_path / "l.zip") as archive:
        assert len(archive.namelist()) == len(COLOURS)
    # A URL FFmpeg opens is an input too
    assert main(["run", str(model), f"file:{clips['webm']}", str(tmp_path / "url.mp4")]) == 0
    with av.open(str(tmp_path / "url.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == len(COLOURS)
    # Errors in plain words, exit status 2
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    cases = [([tmp_path / "missing.mp4", out], "no such video"), ([bad, out], "not a video"),
             ([clips["colours"], tmp_path / "x.avi"], ".mp4")]
    if ON == "cpu":  # NVDEC asked for where there is none
        cases.append(([clips["colours"], out, "--decode", "cuda"], "video_decode is cuda, but"))
    for args, words in cases:
        with pytest.raises(SystemExit) as exc:
            main(["run", str(model), *map(str, args)])
        assert exc.value.code == 2 and words in capsys.readouterr().err


def test_cli_ctrl_c_leaves_a_playable_video(repo, clips, tmp_path):
    out = tmp_path / "partial.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run", str(repo / "engines" / "rgb.onnx"),
                             str(clips["long"]), str(out), "--stats", str(tmp_path / "s.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "frame/s" not in seen and proc.poll() is None:  # the progress bar is moving
            seen += proc.stderr.read(64)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "stopped by Ctrl-C" in stdout
    stats = json.loads((tmp_path / "s.json").read_text())
    with av.open(str(out)) as video:
        decoded = sum(1 for _ in video.decode(video=0))
    assert 0 < decoded == len(stats["frames"]) < 2400
