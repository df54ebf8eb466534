"""The HTTP contract against a real Serve deployment (detection, segmentation, classification graphs,
random weights, tiny images): real requests, every refusal, and the replicas still answering after."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

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
    _assert_error(requests.get(f"{url}/v1/detect", timeout=30), 405, "method_not_allowed")
    _assert_error(_post(url, "/v1/detect", _image(), iou_threshold=-0.1), 422, "invalid_parameter")
