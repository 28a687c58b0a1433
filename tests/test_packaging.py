"""A regular (not editable) install serves the page and segments the sample, outside the checkout: the templates,
static files, sample photo and bundled models all come from the package."""

import subprocess
import sys
import textwrap

from .models import ROOT, SAMPLE

CHECK = textwrap.dedent('''
    import sys
    from pathlib import Path
    import app
    assert Path(app.__file__).is_relative_to(Path(sys.argv[1])), app.__file__  # the installed copy, not the checkout
    from fastapi.testclient import TestClient
    from app.main import create_app
    with TestClient(create_app()) as c:
        page = c.get("/")
        assert page.status_code == 200 and "Segment a photo" in page.text, page.text[:300]
        assert c.get("/static/app.js").status_code == 200
        r = c.post("/segment", files={"image": ("street.png", Path(sys.argv[2]).read_bytes(), "image/png")})
        assert r.status_code == 200 and r.headers["x-image-size"] == "2048x1024", r.text[:300]
        assert c.get("/bench", params={"iterations": 1, "warmup": 0}).status_code in (401, 403)
    print("served", sorted(p.name for p in Path("engines").iterdir()))
''')


def test_wheel_install_serves_page_and_sample(tmp_path):
    wheels, site, run = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    run.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(wheels.glob("bisenet_serve-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", CHECK, str(site), str(SAMPLE)], cwd=run, capture_output=True, text=True,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "camvid_bisenetv2.onnx" in r.stdout  # a fresh repository was filled with the bundled models
