"""The HTTP contract against a real Serve deployment (detection, segmentation, classification graphs,
random weights, tiny images): real requests, every refusal, and the replicas still answering after; the
declared OpenAPI upload and answers (what /docs "Try it out" uses), a multipart body as a browser form
sends it, and the page at GET / with its samples (the page in a browser: test_serve_page.py). One
deployment serves the whole module."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from multinode import free_port

from pipelines.serve.page import SAMPLE_COUNT, SAMPLE_SIZE

PORT = 8461
ARGS = {
    "models": [
        {"name": "ssd", "task": "detection", "arch": "ssdlite_mobilenet_v3", "num_classes": 3,
         "random_weights": True, "image_size": 64, "batching": {"calibrate": True},
         "model": {"num_cpus": 0.2, "max_ongoing_requests": 8}},
        {"name": "mask", "task": "segmentation", "arch": "maskrcnn_resnet18_fpn", "num_classes": 3,
         "random_weights": True, "image_size": 64, "model": {"num_cpus": 0.2, "max_ongoing_requests": 8}},
        {"name": "squeeze", "task": "classification", "arch": "squeezenet1_1", "num_classes": 3,
         "random_weights": True, "image_size": 48, "model": {"num_cpus": 0.2, "max_ongoing_requests": 8}},
    ],
    # Small limits so that "too large" needs only a small request.
    "limits": {"max_body_bytes": 200_000, "max_image_pixels": 512 * 512},
    "nms": {"score_threshold": 0.0, "iou_threshold": 0.5, "max_detections": 50},
    "preprocess": {"num_cpus": 0.1}, "postprocess": {"num_cpus": 0.1}, "nms_stage": {"num_cpus": 0.1},
    "ingress": {"num_cpus": 0.1},
}


@pytest.fixture(scope="module")
def url(ray_cluster):
    from pipelines.serve import deploy, shutdown

    base = deploy(ARGS, port=PORT)
    yield base
    shutdown()


def _image(w=80, h=60, fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _post(url, path, data, ctype="image/jpeg", **params):
    return requests.post(f"{url}{path}", data=data, params=params, headers={"content-type": ctype}, timeout=120)


def _assert_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body


def test_preprocess_and_postprocess_run_inside_the_ingress_by_default(url):
    from ray import serve

    deployments = set(serve.status().applications["visionflow"].deployments)
    # Two handle calls per detection (model, NMS stage), not four: no Preprocess or Postprocess replicas.
    assert deployments == {"Ingress", "NmsStage", "Detector_ssd", "Detector_mask", "Classifier_squeeze"}, deployments
    r = _post(url, "/v1/detect", _image())
    assert r.status_code == 200
    assert [part.split(";")[0] for part in r.headers["Server-Timing"].split(", ")] == \
        ["preprocess", "model", "nms", "postprocess", "total"]


def test_detect_raw_jpeg_boxes_in_sent_pixels(url):
    r = _post(url, "/v1/detect", _image(200, 90), max_detections=20)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 200, "height": 90} and body["model"] == "ssd"
    dets = body["detections"]
    assert 0 < len(dets) <= 20
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 200 and 0 <= y1 <= y2 <= 90
        assert d["category_id"] in (1, 2, 3) and d["label"].startswith("class_") and 0 <= d["score"] <= 1
    # Boxes of a 200-px-wide image reach past the 64-px model input: they were scaled back.
    assert max(d["box"][2] for d in dets) > 64
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    assert "nms;dur=" in r.headers["server-timing"]


def test_detect_png_and_multipart_and_model_by_name(url):
    png = _image(64, 64, "PNG")
    assert _post(url, "/v1/detect", png, "image/png").status_code == 200
    r = requests.post(f"{url}/v1/detect", files={"file": ("a.png", png, "image/png")}, params={"model": "ssd"},
                      timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ssd"


def test_query_parameters_filter_and_suppress(url):
    img = _image(96, 96, seed=3)
    all_ = _post(url, "/v1/detect", img, max_detections=1000, iou_threshold=1.0).json()["detections"]
    few = _post(url, "/v1/detect", img, max_detections=3, iou_threshold=1.0).json()["detections"]
    assert len(few) == 3 and few == all_[:3]
    hard = _post(url, "/v1/detect", img, max_detections=1000, iou_threshold=0.1).json()["detections"]
    assert len(hard) < len(all_)
    cut = sorted(d["score"] for d in all_)[len(all_) // 2]
    high = _post(url, "/v1/detect", img, max_detections=1000, iou_threshold=1.0, score_threshold=cut).json()
    assert high["detections"] and all(d["score"] >= cut - 1e-5 for d in high["detections"])
    above = min(1.0, max(d["score"] for d in all_) + 1e-3)
    assert _post(url, "/v1/detect", img, score_threshold=above).json()["detections"] == []


def test_segment_returns_rle_masks_of_the_sent_size(url):
    r = _post(url, "/v1/segment", _image(90, 70, "PNG"), "image/png", max_detections=5)
    assert r.status_code == 200, r.text
    dets = r.json()["detections"]
    assert dets and len(dets) <= 5
    for d in dets:
        assert d["mask"]["size"] == [70, 90]
        m = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
        assert m.shape == (70, 90)


def test_classify_top_k(url):
    r = _post(url, "/v1/classify", _image(50, 40), top_k=2)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and preds[0]["score"] >= preds[1]["score"]
    assert {p["category_id"] for p in preds} <= {1, 2, 3}
    assert len(_post(url, "/v1/classify", _image(50, 40)).json()["predictions"]) == 3  # top_k 5, 3 classes


def test_models_health_docs(url):
    models = requests.get(f"{url}/v1/models", timeout=30).json()["models"]
    assert {m["name"]: m["task"] for m in models} == {"ssd": "detection",
                                                      "mask": "segmentation", "squeeze": "classification"}
    assert all(m["source"] == "random-weights" for m in models)
    # The detector's replica timed its model at start (batching.calibrate) and caps its batches at the fastest
    # size measured, within the configured maximum; the others keep their maximum.
    by_name = {m["name"]: m for m in models}
    ssd = by_name.pop("ssd")
    rates = {int(b): r for b, r in ssd["batch_rates"].items()}
    assert rates and min(rates) == 1 and max(rates) <= ssd["max_batch_size"] == 8 and all(r > 0 for r in rates.values())
    assert ssd["batch_size_cap"] in rates and rates[ssd["batch_size_cap"]] == max(rates.values()), ssd
    assert all(m["batch_rates"] == {} and m["batch_size_cap"] == m["max_batch_size"] for m in by_name.values())
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/detect", "/v1/segment", "/v1/classify", "/v1/models", "/healthz"} <= set(spec["paths"])


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("path", ["/v1/detect", "/v1/segment", "/v1/classify"])
def test_bad_input_answers_json_errors_and_replicas_stay_up(url, path):
    _assert_error(_post(url, path, b"not an image at all"), 400, "not_an_image")
    _assert_error(_post(url, path, b"\xff\xd8\xff\xe0" + b"\0" * 100), 400, "not_an_image")  # truncated JPEG
    _assert_error(_post(url, path, b"x" * 300_000), 413, "too_large")  # bytes
    _assert_error(_post(url, path, _bomb(), "image/png"), 413, "too_large")  # pixels, tiny file
    _assert_error(_post(url, path, _image(), "text/plain"), 415, "unsupported_media_type")
    _assert_error(_post(url, path, json.dumps({"a": 1}).encode(), "application/json"), 415, "unsupported_media_type")
    r = requests.post(f"{url}{path}", files={"file": ("a.txt", b"hello", "text/plain")}, timeout=60)
    _assert_error(r, 415, "unsupported_media_type")
    r = requests.post(f"{url}{path}", files={"other": ("a.jpg", _image(), "image/jpeg")}, timeout=60)
    _assert_error(r, 400, "not_an_image")
    _assert_error(_post(url, path, _image(), score_threshold=1.5), 422, "invalid_parameter")
    _assert_error(_post(url, path, _image(), max_detections=0), 422, "invalid_parameter")
    _assert_error(_post(url, path, _image(), score_threshold="high"), 422, "invalid_parameter")
    _assert_error(_post(url, path, _image(), model="nope"), 422, "invalid_parameter")
    # The same replicas answer a valid request right after.
    assert _post(url, path, _image(), max_detections=3).status_code == 200


def test_other_errors_keep_the_shape(url):
    _assert_error(requests.get(f"{url}/v1/nothing", timeout=30), 404, "not_found")
    r = requests.get(f"{url}/v1/detect", timeout=30)
    _assert_error(r, 405, "method_not_allowed")
    assert r.headers.get("allow") == "POST", r.headers
    _assert_error(_post(url, "/v1/detect", _image(), iou_threshold=-0.1), 422, "invalid_parameter")
    # Ignored before (the defaults applied, or the last value won): a quietly other answer.
    for path, query in (("/v1/detect", "score-threshold=0.9"), ("/v1/detect", "top_k=3"),
                        ("/v1/classify", "iou_threshold=0.5"),
                        ("/v1/detect", "score_threshold=0.9&score_threshold=0.1"),
                        ("/v1/classify", "top_k=2&max_detections=7")):
        r = requests.post(f"{url}{path}?{query}", data=_image(), headers={"content-type": "image/jpeg"}, timeout=120)
        _assert_error(r, 422, "invalid_parameter")
        assert query.split("=")[0] in r.json()["error"]["message"], r.text


# -- What the OpenAPI and page checks below send ----------------------------------------------------

ROUTES = {"/v1/detect": "detections", "/v1/segment": "detections", "/v1/classify": "predictions"}
IMAGE_TYPES = ("image/jpeg", "image/png", "application/octet-stream")


def _browser_form(data: bytes, filename: str, ctype: str) -> tuple[bytes, str]:
    """A multipart body byte for byte as Chromium sends a <form enctype="multipart/form-data"> (and
    Swagger UI's "Try it out"): WebKit boundary, filename, the part's own Content-Type."""
    boundary = "----WebKitFormBoundaryq4lB2aZ3tW0xYv9K"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _validator(spec: dict, name: str):
    """A JSON Schema validator of ``components.schemas[name]`` of an OpenAPI 3.1 document."""
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": spec["components"]})


def _ref(spec: dict, schema: dict) -> dict:
    return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]


# -- OpenAPI: what /docs shows and "Try it out" sends ---------------------------------------------

def test_openapi_declares_the_upload_body_and_the_answers(url):
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.")
    for path, items in ROUTES.items():
        op = spec["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        content = body["content"]
        form = content["multipart/form-data"]["schema"]
        assert form["type"] == "object" and form["required"] == ["file"], path
        assert form["properties"]["file"]["type"] == "string" and form["properties"]["file"]["format"] == "binary"
        for media in IMAGE_TYPES:
            assert content[media]["schema"] == {"type": "string", "format": "binary", "contentMediaType": media}
        ok = op["responses"]["200"]
        answer = _ref(spec, ok["content"]["application/json"]["schema"])
        assert items in answer["properties"] and items in answer["required"], (path, answer)
        item = answer["properties"][items]["items"]
        assert {"score", "category_id", "label"} <= set(_ref(spec, item)["properties"])
        assert "Server-Timing" in ok["headers"]
        for status in ("400", "413", "415", "422", "503"):
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorAnswer")
        # The query parameters are still declared as before.
        assert {p["name"] for p in op["parameters"]} >= {"score_threshold", "model"}
    item = _ref(spec, _ref(spec, spec["paths"]["/v1/segment"]["post"]["responses"]["200"]["content"]
                          ["application/json"]["schema"])["properties"]["detections"]["items"])
    assert {"box", "mask"} <= set(item["properties"])
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"code", "message"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # every 422 is the API's own shape


def test_answers_match_their_declared_schemas(url):
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    png = _image(96, 72, "PNG")
    for path, name in (("/v1/detect", "DetectAnswer"), ("/v1/segment", "DetectAnswer"),
                       ("/v1/classify", "ClassifyAnswer")):
        r = requests.post(f"{url}{path}", data=png, headers={"content-type": "image/png"},
                          params={"max_detections": 3}, timeout=120)
        assert r.status_code == 200, r.text
        _validator(spec, name).validate(r.json())
    _validator(spec, "ModelsAnswer").validate(requests.get(f"{url}/v1/models", timeout=30).json())
    _validator(spec, "HealthAnswer").validate(requests.get(f"{url}/healthz", timeout=30).json())
    _validator(spec, "SamplesAnswer").validate(requests.get(f"{url}/v1/samples", timeout=30).json())
    bad = requests.post(f"{url}/v1/detect", data=b"nope", headers={"content-type": "text/plain"}, timeout=30)
    assert bad.status_code == 415
    _validator(spec, "ErrorAnswer").validate(bad.json())


def test_a_browser_form_upload_equals_the_raw_body(url):
    png = _image(96, 72, "PNG", seed=5)
    for path, items in ROUTES.items():
        params = {"max_detections": 5}
        raw = requests.post(f"{url}{path}", data=png, headers={"content-type": "image/png"}, params=params,
                            timeout=120)
        body, ctype = _browser_form(png, "my photo.png", "image/png")
        form = requests.post(f"{url}{path}", data=body, headers={"content-type": ctype}, params=params, timeout=120)
        assert raw.status_code == form.status_code == 200, (path, form.text)
        assert form.json()[items] and form.json() == raw.json(), path
        assert "total;dur=" in form.headers["server-timing"]
    # A form whose file part is not an image type is refused as before.
    body, ctype = _browser_form(b"hello", "notes.txt", "text/plain")
    r = requests.post(f"{url}/v1/detect", data=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


# -- The page ---------------------------------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_root_page_has_the_form_and_no_external_assets(url):
    r = requests.get(f"{url}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    tags = _Tags()
    tags.feed(r.text)
    by_id = {a.get("id"): (t, a) for t, a in tags.tags if a.get("id")}
    assert by_id["file"] == ("input", {"type": "file", "id": "file", "name": "file",
                                       "accept": "image/jpeg,image/png"})
    assert by_id["endpoint"][0] == "select" and by_id["form"][0] == "form" and by_id["run"][0] == "button"
    assert by_id["canvas"][0] == "canvas" and by_id["results"][0] == "table" and by_id["timings"][0] == "table"
    assert {"score_threshold", "max_detections", "samples", "status"} <= set(by_id)
    # Self-contained: inline script and style only, nothing fetched from another host.
    assert not [a for t, a in tags.tags if t in ("script", "img", "iframe") and a.get("src")]
    assert not [a for t, a in tags.tags if t == "link"]
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    # The page's own calls are relative, so it also works behind a route prefix.
    for call in ('fetch("v1/models")', 'fetch("v1/samples")', '"v1/" + endpoint'):
        assert call in r.text


def test_samples_are_pngs_drawn_on_the_fly(url):
    listing = requests.get(f"{url}/v1/samples", timeout=30).json()["samples"]
    assert len(listing) == SAMPLE_COUNT
    for s in listing:
        r = requests.get(f"{url}/{s['url']}", timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "PNG" and img.size == (s["width"], s["height"]) == (SAMPLE_SIZE, SAMPLE_SIZE)
        assert np.asarray(img).std() > 10  # shapes on a texture, not a blank image
    first = requests.get(f"{url}/v1/samples/0.png", timeout=30).content
    assert requests.get(f"{url}/v1/samples/0.png", timeout=30).content == first
    assert first != requests.get(f"{url}/v1/samples/1.png", timeout=30).content
    r = requests.get(f"{url}/v1/samples/{SAMPLE_COUNT}.png", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{url}/v1/samples/x.png", timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    # A sample goes through the endpoints like any upload.
    r = requests.post(f"{url}/v1/detect", data=first, headers={"content-type": "image/png"}, timeout=120)
    assert r.status_code == 200 and r.json()["image"] == {"width": SAMPLE_SIZE, "height": SAMPLE_SIZE}


BESIDE = """
import sys
from pipelines.ray_runtime import LOCAL, connect
connect(LOCAL, num_cpus=1, dashboard=False, quiet=True, log_to_driver=False)
from ray import serve

@serve.deployment(ray_actor_options={"num_cpus": 0.1})
def hello(request):
    return "hello"

serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(hello.bind(), name="hello", route_prefix="/")
print("serving", flush=True)
sys.stdin.read()  # until the test ends it
"""


def _programs(port: int) -> set[str]:
    from pipelines import procfs

    return {os.path.basename(procfs.program(p) or "") for p in procfs.listeners(port)}


def test_the_http_port_is_haproxys_and_a_second_local_cluster_serves_beside_it(url, tmp_path):
    """Where its executable is installed (``ray[serve]`` bundles one on Linux), a local cluster's Serve takes
    requests through HAProxy on the configured port, with ports of the cluster's own: a second local cluster
    on the machine serves beside the first, each answering with its own application (on Serve's fixed ports
    the second HAProxy could not start, or sent requests to the first cluster's Ingress), and when the
    second's process is killed (``kill -9``) its HAProxy goes with it, freeing its port."""
    from pipelines import procfs, ray_private

    if ray_private.haproxy_binary() is None:
        pytest.skip("no HAProxy executable here: Serve keeps its Python proxy")
    assert _programs(PORT) == {"haproxy"}
    raylet = ray_private.raylets_started_here()[0]
    stats, metrics, fallback = (int(procfs.environ_value(raylet, n)) for n in ray_private.HAPROXY_PORT_ENVS[:3])
    assert _programs(stats) == _programs(metrics) == {"haproxy"} and _programs(fallback) == {"ray::ProxyActor"}
    port = free_port()
    (tmp_path / "beside.py").write_text(BESIDE)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "beside.py"), str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a start that never ends fails the test, not the suite
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:  # ends when the process does
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1].startswith("serving"), "".join(lines)
        for _ in range(5):
            assert requests.get(f"http://127.0.0.1:{port}/", timeout=30).text == "hello"
            assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
        theirs = set(procfs.listeners(port))
        assert _programs(port) == {"haproxy"} and not theirs & set(procfs.listeners(PORT))
        # No port is listened on by both clusters (Serve's fallback proxies bind theirs with SO_REUSEPORT).
        second = ray_private.raylet_of(next(iter(theirs)))
        by_cluster = {raylet: set(), second: set()}
        for p, holders in procfs.listening().items():
            for owner in map(ray_private.raylet_of, holders):
                if owner in by_cluster:
                    by_cluster[owner].add(p)
        assert by_cluster[raylet] and by_cluster[second] and not by_cluster[raylet] & by_cluster[second], by_cluster
        proc.kill()  # SIGKILL: no exit handler of its runs
        proc.wait(30)
        deadline = time.monotonic() + 30
        while procfs.listeners(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not procfs.listeners(port) and not [p for p in theirs if procfs.alive(p)]
        assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
