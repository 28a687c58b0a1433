"""The page's Live mode in real Chromium with a fake camera playing a street clip, against the real server with the
bundled model: masks arrive, change with the picture, and the rate, latency and drops are shown. Also a result
video of a video job plays in Chromium's <video>."""

import shutil
import time

import httpx
import pytest

from .models import BUNDLED
from .server import Server
from .test_page import ARGS, CHROMIUM, playwright
from .videos import scene_frames, write_clip, write_y4m

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("live-page")
    shutil.copytree(BUNDLED, root / "engines")
    s = Server(root / "engines", model="camvid_bisenetv2", env={"SEGMENT_RESULTS_DIR": str(root / "results")})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory):
    """Two different streets, alternating every 5 frames: the masks must change with them."""
    frames = scene_frames(40, 240, 320)
    scenes = [frames[0]] * 5 + [frames[-1]] * 5
    return write_y4m(tmp_path_factory.mktemp("camera") / "street.y4m", scenes, fps=10)


def digest_of_result(page) -> str:
    return page.evaluate("""async () => {
        const data = await (await fetch(document.getElementById('live-result').src)).arrayBuffer();
        return Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', data))).join(',');
    }""")


def test_live_mode_segments_the_fake_camera(server, camera_clip, tmp_path):
    args = [*ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={camera_clip}"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(server.url)
            page.select_option("#live-view", "mask")
            page.click("#live-start")
            digests = set()
            deadline = time.time() + 180
            while len(digests) < 2 and time.time() < deadline:
                page.wait_for_function("Number(document.getElementById('live-received').textContent) > 0",
                                       timeout=120_000)
                digests.add(digest_of_result(page))
                page.wait_for_timeout(300)
            assert len(digests) >= 2  # the mask follows the picture
            page.wait_for_function("document.getElementById('live-fps').textContent !== '–'", timeout=120_000)
            assert float(page.inner_text("#live-fps")) > 0
            assert page.inner_text("#live-latency").endswith(" ms")
            assert int(page.inner_text("#live-dropped")) >= 0 and page.is_hidden("#live-error")
            size = page.evaluate("[document.getElementById('live-result').naturalWidth, "
                                 "document.getElementById('live-result').naturalHeight]")
            assert size == [320, 240]  # the camera's frame size
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
            page.click("#live-stop")
            assert page.is_enabled("#live-start")
        finally:
            browser.close()


def test_a_result_video_plays_in_chromium(server, tmp_path):
    clip = write_clip(tmp_path / "drive.mp4", scene_frames(6, 240, 320), fps=10)
    r = httpx.post(f"{server.url}/segment/video", files={"video": ("drive.mp4", clip.read_bytes())}, timeout=60)
    url = server.url + r.json()["status_url"]
    deadline = time.time() + 180
    while (status := httpx.get(url).json())["state"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.2)
    assert status["state"] == "done", status
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url)  # same origin
            played = page.evaluate("""async (src) => {
                const v = document.createElement('video');
                v.muted = true; v.src = src; document.body.appendChild(v);
                await v.play();
                await new Promise((ok) => v.addEventListener('ended', ok, { once: true }));
                return [v.videoWidth, v.videoHeight, v.duration, v.error];
            }""", status["video_url"])
        finally:
            browser.close()
    width, height, duration, error = played
    assert (width, height, error) == (320, 240, None) and duration == pytest.approx(0.6, abs=0.05)
