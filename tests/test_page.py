"""The upload page in a real browser: Debian's Chromium driven by Playwright, against the real server."""

import shutil
from pathlib import Path

import pytest

from .models import BUNDLED, ROOT, SAMPLE, png_bytes, quadrants

from .server import Server

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)")

# As the machine's notes advise: no sandbox as root, and no background network traffic on a closed network.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engines = tmp_path_factory.mktemp("repo") / "engines"
    shutil.copytree(BUNDLED, engines)  # the bundled, trained default model
    s = Server(engines, model="camvid_bisenetv2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def test_upload_shows_mask_overlay_legend_and_errors(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    assert "untrained" not in page.inner_text("header")
    assert "camvid_bisenetv2" in page.inner_text("#model-info")
    assert page.get_attribute("label[for=image]", "for") == "image"  # the drop zone is the file input's label

    page.set_input_files("#image", str(SAMPLE))
    page.wait_for_selector("#preview", state="visible")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    page.wait_for_function("document.getElementById('mask').naturalWidth > 0")

    sizes = page.evaluate("""() => {
        const o = document.getElementById('original'), m = document.getElementById('mask'), c = document.getElementById('overlay');
        return [o.naturalWidth, o.naturalHeight, m.naturalWidth, m.naturalHeight, c.width, c.height];
    }""")
    assert sizes == [2048, 1024, 2048, 1024, 2048, 1024]  # mask and overlay keep the original's size and aspect

    percents = [float(p) for p in page.eval_on_selector_all("#legend li", "els => els.map(e => e.dataset.percent)")]
    names = page.eval_on_selector_all("#legend li .name", "els => els.map(e => e.textContent)")
    assert len(percents) >= 3 and abs(sum(percents) - 100.0) < 0.01
    assert {"road", "building", "car"} <= set(names)
    assert "inference" in page.inner_text("#timings")
    assert page.get_attribute("#download-mask", "href").startswith("data:image/png;base64,")

    page.fill("#opacity", "20")
    page.dispatch_event("#opacity", "input")
    assert page.get_attribute("#overlay", "data-alpha") == "0.2"
    assert page.inner_text("#opacity-value") == "20%"
    page.screenshot(path=str(tmp_path / "result.png"), full_page=True)

    # Not an image: the server's 415 shown inline, in plain words.
    page.set_input_files("#image", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"just text"}])
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error")
    assert page.is_hidden("#results")  # no stale result beside the error
    page.wait_for_selector("#preview", state="hidden")  # the browser's decode failure hides it (asynchronously)
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
    page.close()


def test_phone_sized_screen_and_keyboard(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(server.url)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") in ("drop-zone", "image")
    page.set_input_files("#image", str(SAMPLE))
    page.keyboard.press("Enter") if page.evaluate("document.activeElement.id") == "submit" else page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # no horizontal scrolling on a phone
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    page.close()


def test_model_picker_sends_the_chosen_model(server, browser):
    """With two models loaded: the picker lists both (the default selected), the header follows the choice, and
    the choice goes with the request."""
    import httpx

    from .server import TOKEN

    auth = {"Authorization": f"Bearer {TOKEN}"}
    int8 = "camvid_bisenetv2_int8"
    assert httpx.post(f"{server.url}/models/{int8}/load", headers=auth, timeout=120).status_code == 200
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(server.url)
        options = page.eval_on_selector_all("#model-picker option", "els => els.map(e => e.value)")
        assert options == ["camvid_bisenetv2", int8]
        assert page.input_value("#model-picker") == "camvid_bisenetv2"
        page.select_option("#model-picker", int8)
        assert page.inner_text("#model-name") == int8 and "int8" in page.inner_text("#model-meta")
        page.set_input_files("#image", str(SAMPLE))
        page.wait_for_selector("#preview", state="visible")
        with page.expect_response(lambda r: "/segment/json" in r.url) as answer:
            page.click("#submit")
        assert f"model={int8}" in answer.value.url and answer.value.json()["model"]["name"] == int8
        page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    finally:
        page.close()
        httpx.post(f"{server.url}/models/{int8}/unload", headers=auth, timeout=60)


def answer_first(kind: str):
    """A route handler for /segment/json: the first request answered as ``kind`` says (a 503 with Retry-After: 1,
    a proxy's plain-text 500, or no answer), the next ones by the real server; ``seen`` counts them."""
    seen = []

    def handle(route):
        seen.append(route.request.url)
        if len(seen) > 1:
            route.continue_()
        elif kind == "503":
            route.fulfill(status=503, headers={"Retry-After": "1"}, json={"detail": "no model replica is free"})
        elif kind == "proxy 500":  # Ray Serve's proxy, for a request whose replica was lost with its node
            route.fulfill(status=500, content_type="text/plain; charset=utf-8", body="Internal Server Error")
        else:
            route.abort("connectionreset")
    return handle, seen


@pytest.mark.parametrize("kind", ["503", "proxy 500", "no answer"])
def test_a_busy_server_is_tried_once_more(server, browser, kind):
    """The first answer a 503 + Retry-After, a proxy's 500 or none at all: the status line says it retries, and the
    mask of the second, real answer arrives."""
    page = browser.new_page()
    handle, seen = answer_first(kind)
    page.route("**/segment/json*", handle)
    page.goto(server.url)
    page.evaluate("""() => { window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }""")
    photo = png_bytes(quadrants(96, 160)[0])
    page.set_input_files("#image", files=[{"name": "p.png", "mimeType": "image/png", "buffer": photo}])
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    assert page.evaluate("document.getElementById('mask').naturalWidth") == 160
    assert len(seen) == 2 and page.is_hidden("#error")
    assert any("retrying" in s for s in page.evaluate("window.statuses")), page.evaluate("window.statuses")
    assert page.inner_text("#status").startswith("Done in")
    page.close()


def test_a_second_503_shows_the_servers_detail(server, browser):
    page = browser.new_page()
    seen = []

    def busy(route):
        seen.append(1)
        route.fulfill(status=503, headers={"Retry-After": "0"}, json={"detail": f"no model replica is free ({len(seen)})"})
    page.route("**/segment/json*", busy)
    page.goto(server.url)
    page.set_input_files("#image", files=[{"name": "p.png", "mimeType": "image/png",
                                           "buffer": png_bytes(quadrants(32, 32)[0])}])
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert len(seen) == 2  # once more, not again and again
    assert "cannot segment right now" in page.inner_text("#error")
    assert "no model replica is free (2)" in page.inner_text("#error")
    page.close()
