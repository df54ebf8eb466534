"""The Serve app's page in a browser: the page's COCO RLE decoder (JS, run by node) against pycocotools,
and (slow) the page itself driven in headless Chromium. The page's HTTP side (GET / and its samples, the
declared OpenAPI upload and answers, a multipart body as a browser form sends it) is checked in
test_serve_http.py against its deployment.

Real Serve deployment (random weights, tiny model inputs) as in test_serve_http.py. The README's picture
comes from the browser test run with a trained detector in place of the random one:

    VF_SCREENSHOT_CHECKPOINT=RUN_DIR .venv/bin/python -m pytest -m slow tests/test_serve_page.py

(RUN_DIR: a `visionflow train --task detection` run; docs/serving.md says which). Without it the
screenshot is only a test artefact.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.serve.page import RLE_JS, SAMPLE_COUNT

from test_serve_http import ARGS as HTTP_ARGS, _browser_form  # noqa: E402 -- tests/ is on sys.path

PORT = 8466
ROOT = Path(__file__).resolve().parents[1]
README_SCREENSHOT = ROOT / "docs" / "images" / "serve_page.png"
TRAINED = os.environ.get("VF_SCREENSHOT_CHECKPOINT")  # a trained detector for the README's picture
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARGS = {
    # The three tiny models of the HTTP contract tests (the detector a trained one for the README picture).
    "models": ([{"name": "ssd", "task": "detection", "checkpoint": TRAINED,
                 "model": {"num_cpus": 0.5, "max_ongoing_requests": 8}}] if TRAINED else HTTP_ARGS["models"][:1])
              + HTTP_ARGS["models"][1:],
    "nms": {"score_threshold": 0.0, "iou_threshold": 0.5, "max_detections": 50},
    "preprocess": {"num_cpus": 0.1}, "postprocess": {"num_cpus": 0.1}, "nms_stage": {"num_cpus": 0.1},
    "ingress": {"num_cpus": 0.1},
}


@pytest.fixture(scope="module")
def url(ray_cluster):
    """The browser test's own deployment (``-m slow``; the README's picture may want a trained detector)."""
    from pipelines.serve import deploy, shutdown

    base = deploy(ARGS, port=PORT)
    yield base
    shutdown()


def _rle_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = [np.zeros((5, 7), np.uint8), np.ones((6, 4), np.uint8), np.zeros((1, 1), np.uint8),
             np.ones((1, 1), np.uint8)]
    last = np.zeros((9, 11), np.uint8)
    last[-1, -1] = 1
    cases.append(last)
    for h, w in ((30, 40), (300, 200), (517, 389)):
        m = np.zeros((h, w), np.uint8)
        for _ in range(6):  # rectangles: long runs (several 5-bit groups), growing and shrinking deltas
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0: y0 + rng.integers(1, h), x0: x0 + rng.integers(1, w)] ^= 1
        cases.append(m)
        cases.append((rng.random((h, w)) < 0.5).astype(np.uint8))  # short runs
    big = np.zeros((2048, 2048), np.uint8)
    big[1000:1900, 3:2000] = 1  # counts over 2^20
    cases.append(big)
    return cases


def test_page_rle_decoder_matches_pycocotools(tmp_path):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: the page's RLE decoder is checked in Chromium by the slow test")
    cases = _rle_cases()
    rles = []
    for m in cases:
        rle = mask_utils.encode(np.asfortranarray(m))
        rles.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    script = tmp_path / "rle.js"
    script.write_text(RLE_JS + """
const rles = JSON.parse(require("fs").readFileSync(0, "utf8"));
// Per mask: its number of ones and the row-major indices of the first 50 and of the last one.
const out = rles.map((r) => { const m = rleDecode(r); const on = [];
  for (let i = 0; i < m.length; i++) if (m[i]) on.push(i);
  return {sum: on.length, head: on.slice(0, 50), last: on.length ? on[on.length - 1] : -1,
          hash: on.reduce((a, i) => (a * 31 + i) % 1000000007, 7)}; });
process.stdout.write(JSON.stringify(out));
""")
    res = subprocess.run([node, str(script)], input=json.dumps(rles), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for k, (m, got) in enumerate(zip(cases, json.loads(res.stdout))):
        on = np.flatnonzero(m.ravel())  # row-major, as the page's canvas wants
        h = 7
        for i in on.tolist():
            h = (h * 31 + i) % 1000000007
        assert got["sum"] == len(on) and got["head"] == on[:50].tolist(), k
        assert got["last"] == (int(on[-1]) if len(on) else -1) and got["hash"] == h, k


# -- The page in headless Chromium (slow) ---------------------------------------------------------

def _chromium():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is absent: install Debian's chromium and chromium-driver "
                    f"(apt-get install -y chromium chromium-driver) to test the page in a browser")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1200", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def _run_and_wait(driver, action, timeout=180, expect="done") -> None:
    """Do ``action`` (which starts a request on the page) and wait for the page to finish it."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = int(driver.execute_script("return Number(document.body.dataset.runs || 0)"))
    action()
    WebDriverWait(driver, timeout).until(
        lambda d: int(d.execute_script("return Number(document.body.dataset.runs || 0)")) > before)
    state = driver.execute_script("return document.body.dataset.state")
    assert state == expect, driver.find_element("id", "status").text


def _rows(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#results tbody tr')].map((tr) => ({
            label: tr.dataset.label, score: Number(tr.dataset.score), category_id: Number(tr.dataset.categoryId),
            box: tr.dataset.box ? JSON.parse(tr.dataset.box) : null,
            mask_pixels: tr.dataset.maskPixels === undefined ? null : Number(tr.dataset.maskPixels),
            text: tr.innerText}));""")


@pytest.mark.slow
def test_page_in_headless_chromium(url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _chromium()
    try:
        t0 = time.perf_counter()
        driver.get(f"{url}/")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "idle")
        options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#endpoint option")]
        assert options == ["detect|ssd", "segment|mask", "classify|squeeze"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#samples button img")) == SAMPLE_COUNT
        png = requests.get(f"{url}/v1/samples/2.png", timeout=30).content
        image = tmp_path / "shapes.png"
        image.write_bytes(png)

        def api(path):
            body, ctype = _browser_form(png, image.name, "image/png")
            r = requests.post(f"{url}{path}", data=body, headers={"content-type": ctype},
                              params={"max_detections": 10}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        endpoint = Select(driver.find_element(By.ID, "endpoint"))
        # Classify, then segment (masks decoded in the page), then detect: the screenshot.
        endpoint.select_by_value("classify|squeeze")
        _run_and_wait(driver, lambda: driver.find_element(By.ID, "file").send_keys(str(image)))
        want = api("/v1/classify")["predictions"]
        got = _rows(driver)
        assert [(r["label"], r["category_id"]) for r in got] == [(p["label"], p["category_id"]) for p in want]
        assert [r["score"] for r in got] == pytest.approx([p["score"] for p in want], abs=1e-6)

        _run_and_wait(driver, lambda: endpoint.select_by_value("segment|mask"))
        want = api("/v1/segment")["detections"]
        got = _rows(driver)
        assert len(got) == len(want) > 0
        for r, d in zip(got, want):
            assert r["box"] == pytest.approx(d["box"], abs=1e-6) and r["label"] == d["label"]
            m = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
            assert r["mask_pixels"] == int(m.sum())
        driver.save_screenshot(str(tmp_path / "segment.png"))

        _run_and_wait(driver, lambda: endpoint.select_by_value("detect|ssd"))
        want = api("/v1/detect")["detections"]
        got = _rows(driver)
        assert len(got) == len(want) == 10
        for r, d in zip(got, want):
            assert r["box"] == pytest.approx(d["box"], abs=1e-6)
            assert (r["label"], r["category_id"]) == (d["label"], d["category_id"])
            assert r["score"] == pytest.approx(d["score"], abs=1e-6)
            assert ", ".join(f"{v:.1f}" for v in d["box"]) in r["text"]  # what the table shows
        timings = driver.execute_script(
            "return [...document.querySelectorAll('#timings tr')].map((tr) => tr.dataset.name)")
        assert timings[:5] == ["preprocess", "model", "nms", "postprocess", "total"]
        # The boxes are on the canvas (the first one's colour is there, the sample has none of it), scaled
        # from the 256-px image to 640 px.
        drawn = driver.execute_script("""
            const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] === 0xe6 && d[i + 1] === 0x19 && d[i + 2] === 0x4b) n++;
            return [c.width, c.height, n];""")
        assert drawn[:2] == [640, 640] and drawn[2] > 50, drawn
        assert "error" not in driver.find_element(By.ID, "status").get_attribute("class")

        # Query parameters from the form; an API refusal is shown as such; the next run works again.
        driver.find_element(By.ID, "score_threshold").send_keys("1")
        _run_and_wait(driver, lambda: driver.find_element(By.ID, "run").click())
        assert _rows(driver) == [] and "0 detection(s)" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "score_threshold").send_keys(".5")  # 1.5: the browser lets run() send it
        _run_and_wait(driver, lambda: driver.execute_script("window.visionflow.run()"), expect="error")
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("422 invalid_parameter: score_threshold"), status
        driver.find_element(By.ID, "score_threshold").clear()
        _run_and_wait(driver, lambda: driver.find_element(By.ID, "run").click())
        assert len(_rows(driver)) == 10
        if TRAINED:  # the picture shows what the trained detector is sure of
            driver.find_element(By.ID, "score_threshold").send_keys("0.3")
            _run_and_wait(driver, lambda: driver.find_element(By.ID, "run").click())
            assert len(_rows(driver)) > 0

        # The whole page in the screenshot: the window grows by what the viewport misses.
        inner, full = driver.execute_script("return [window.innerHeight, document.documentElement.scrollHeight]")
        size = driver.get_window_size()
        driver.set_window_size(size["width"], size["height"] + max(0, full - inner))
        shot_path = README_SCREENSHOT if TRAINED else tmp_path / "page.png"
        assert driver.save_screenshot(str(shot_path))
        print(f"page test {time.perf_counter() - t0:.1f}s; screenshot {shot_path}")
    finally:
        driver.quit()
    shot = Image.open(shot_path)
    assert shot.size[0] == 1280 and shot.size[1] >= full and np.asarray(shot.convert("L")).std() > 20
