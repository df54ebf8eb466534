"""Serving pieces without Ray: config schema, safe decoding, the NMS stage's batched suppression,
mapping back to the image as sent."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pipelines.serve.config import ModelSpec, ServeArgs, load_serve_file
from pipelines.serve.errors import ApiError
from pipelines.serve.images import check_content_type, decode_image, to_tensor
from pipelines.serve.nms_stage import suppress
from pipelines.serve.postprocess import to_sent_image, top_k_items
from vision.ops import batched_nms
from vision.structures import Detections


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_decode_png_and_jpeg_to_rgb():
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = 255
    for fmt in ("PNG", "JPEG"):
        out = decode_image(_encode(arr, fmt), max_pixels=10_000)
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8
        assert out[:, :15].mean() > 240 and out[:, 25:].mean() < 15
    gray = decode_image(_encode(np.full((8, 9), 7, np.uint8), "PNG"), max_pixels=100)
    assert gray.shape == (8, 9, 3)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n-truncated", b"GIF89a" + b"\0" * 40])
def test_decode_refuses_non_images_with_400(data):
    with pytest.raises(ApiError) as e:
        decode_image(data, max_pixels=10_000)
    assert e.value.status == 400 and e.value.code == "not_an_image"


def test_decode_refuses_other_formats_even_if_pillow_reads_them():
    with pytest.raises(ApiError) as e:
        decode_image(_encode(np.zeros((4, 4, 3), np.uint8), "BMP"), max_pixels=100)
    assert e.value.status == 400


def test_decompression_bomb_refused_from_the_header():
    # 6000 x 6000 one-bit PNG: a few KB on the wire, 36 M pixels once decoded.
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ApiError) as e:
        decode_image(buf.getvalue(), max_pixels=4096 * 4096)
    assert e.value.status == 413 and "6000x6000" in e.value.message


def test_content_types():
    for ok in ("image/jpeg", "image/png", "application/octet-stream", "IMAGE/PNG; charset=x", None):
        check_content_type(ok)
    for bad in ("text/plain", "application/json", "application/x-python-pickle", "image/gif"):
        with pytest.raises(ApiError) as e:
            check_content_type(bad)
        assert e.value.status == 415


def test_to_tensor_keeps_aspect_or_squares():
    rgb = np.full((50, 100, 3), 255, np.uint8)
    t, (sx, sy) = to_tensor(rgb, 40, square=False)
    assert t.shape == (3, 20, 40) and t.dtype == torch.float32 and float(t.max()) == 1.0
    assert (sx, sy) == (0.4, 0.4)
    t, (sx, sy) = to_tensor(rgb, 32, square=True)
    assert t.shape == (3, 32, 32) and (sx, sy) == (0.32, 0.64)


def _random_dets(n: int, labels: int, seed: int) -> Detections:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 80
    wh = torch.rand(n, 2, generator=g) * 30 + 5
    return Detections(torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g),
                      torch.randint(1, labels + 1, (n,), generator=g))


def test_suppress_batched_across_requests_equals_per_image_nms():
    items = [{"dets": _random_dets(n, 3, seed), "iou_threshold": iou, "score_threshold": st, "max_detections": md}
             for n, seed, iou, st, md in [(60, 0, 0.5, 0.0, 100), (40, 1, 0.5, 0.3, 100), (0, 2, 0.5, 0.0, 10),
                                          (50, 3, 0.3, 0.1, 5), (30, 4, 0.5, 0.0, 3)]]
    outs = suppress(items, torch.device("cpu"))
    assert len(outs) == len(items)
    for it, (out, index) in zip(items, outs):
        d = it["dets"][it["dets"].scores >= it["score_threshold"]]
        keep = batched_nms(d.boxes, d.scores, d.labels, it["iou_threshold"])[: it["max_detections"]]
        assert torch.equal(out.boxes, d.boxes[keep]) and torch.equal(out.labels, d.labels[keep])
        assert torch.equal(it["dets"].boxes[index], out.boxes)  # indices into the request's candidates
        assert len(out) <= it["max_detections"]
        assert torch.all(out.scores[:-1] >= out.scores[1:])


def test_suppress_never_mixes_images():
    # The same box in two requests: each request keeps its own.
    box = torch.tensor([[10.0, 10, 50, 50]])
    one = Detections(box, torch.tensor([0.9]), torch.tensor([1]))
    items = [{"dets": one, "iou_threshold": 0.5, "score_threshold": 0.0, "max_detections": 10}] * 2
    assert [len(o) for o, _ in suppress(items, torch.device("cpu"))] == [1, 1]


def test_to_sent_image_scales_and_clips_boxes_and_masks():
    masks = torch.zeros(1, 20, 40)
    masks[0, :10, :20] = 1.0
    d = Detections(torch.tensor([[4.0, 2, 20, 10], [30, 15, 45, 25]])[:1], torch.tensor([0.8]),
                   torch.tensor([2]), masks)
    out = to_sent_image(d, input_hw=(20, 40), sent_wh=(100, 50))
    assert torch.allclose(out.boxes, torch.tensor([[10.0, 5, 50, 25]]))
    assert out.masks.shape == (1, 50, 100)
    wide = Detections(torch.tensor([[-5.0, -5, 45, 30]]), torch.tensor([0.5]), torch.tensor([1]))
    assert to_sent_image(wide, (20, 40), (100, 50)).boxes.tolist() == [[0.0, 0.0, 100.0, 50.0]]
    items = out.to_items([{"id": 7, "name": "disk", "label": 1}, {"id": 9, "name": "square", "label": 2}])
    assert items[0]["category_id"] == 9 and items[0]["label"] == "square"
    assert items[0]["mask"]["size"] == [50, 100]


def test_top_k_items_maps_indices_to_categories():
    cats = [{"id": 11, "name": "a", "label": 1}, {"id": 12, "name": "b", "label": 2}, {"id": 13, "name": "c", "label": 3}]
    items = top_k_items(torch.tensor([0.2, 0.7, 0.1]), 2, cats)
    assert [i["category_id"] for i in items] == [12, 11] and items[0]["label"] == "b"
    assert len(top_k_items(torch.tensor([0.2, 0.7, 0.1]), 50, cats)) == 3


def test_config_refuses_bad_specs():
    with pytest.raises(ValidationError, match="random_weights needs"):
        ModelSpec(name="m", random_weights=True)
    with pytest.raises(ValidationError, match="either checkpoint or random_weights"):
        ModelSpec(name="m", checkpoint="x", random_weights=True, task="detection", arch="a", num_classes=2)
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        ModelSpec(name="m", checkpoint="x", batching={"max_batch_size": 32}, model={"max_ongoing_requests": 4})
    with pytest.raises(ValidationError, match="unique"):
        ServeArgs(models=[{"name": "m", "checkpoint": "a"}, {"name": "m", "checkpoint": "b"}])
    with pytest.raises(ValidationError, match="extra"):
        ServeArgs(nms={"iou": 0.5})
    # What Serve itself would refuse only once Ray runs: a queue of 0, batches that cannot fill.
    with pytest.raises(ValidationError, match="max_queued_requests: 0"):
        ServeArgs(ingress={"max_queued_requests": 0})
    with pytest.raises(ValidationError, match="nms_stage.max_ongoing_requests"):
        ServeArgs(nms_stage={"max_ongoing_requests": 8}, nms_batching={"max_batch_size": 16})
    assert ServeArgs(models=[{"name": "m"}]).missing_weights() == ["m"]


def test_a_classifier_only_application_asks_for_no_nms_stage():
    """Its NMS stage is never deployed (no detector calls it), so its CPUs are not asked for either."""
    from pipelines.serve.deploy import DeployError, check_fits

    model = {"random_weights": True, "arch": "resnet18", "num_classes": 3, "model": {"num_cpus": 1}}
    classify = ServeArgs(models=[{"name": "c", "task": "classification", **model}], nms_stage={"num_cpus": 1},
                         ingress={"num_cpus": 0.5})
    assert "nms_stage" not in classify.stages() and classify.cpus_asked() == 1.5
    check_fits(classify, cpus=1.5, gpus=0)  # fits: only the model and the Ingress are deployed
    detect = ServeArgs(models=[{"name": "d", "task": "detection", **model, "arch": "ssdlite_mobilenet_v3"}],
                       nms_stage={"num_cpus": 1}, ingress={"num_cpus": 0.5})
    assert "nms_stage" in detect.stages() and detect.cpus_asked() == 2.5
    with pytest.raises(DeployError, match="asks for 2.5 CPUs but the cluster has 1.5"):
        check_fits(detect, cpus=1.5, gpus=0)
    # A model whose task only its checkpoint knows may be a detector: the stage is counted.
    unknown = ServeArgs(models=[{"name": "u", "checkpoint": "runs/x"}], nms_stage={"num_cpus": 1})
    assert "nms_stage" in unknown.stages()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "cluster" / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_serve_yamls_validate(path):
    http, app, args = load_serve_file(path)
    assert app["import_path"] == "pipelines.serve.app:build_app"
    assert http.host == "127.0.0.1"
    assert args.models, f"{path} serves no model"
    # Ray's own schema (what `serve run` / `serve deploy` read) accepts the same file.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(__import__("yaml").safe_load(path.read_text()))
    # What `serve run` does with import_path + args (untrained weights: the run dirs need not exist).
    from ray.serve import Application

    from pipelines.ray_private import build_serve_app
    from pipelines.serve.app import build_app

    untrained = {**app["args"], "models": [{**m, "checkpoint": None, "random_weights": True}
                                           for m in app["args"]["models"]]}
    assert isinstance(build_serve_app(build_app, untrained), Application)
    with pytest.raises(ValueError, match="--checkpoint"):
        build_app({**app["args"], "models": [{**m, "checkpoint": None} for m in app["args"]["models"]]})


def test_a_lost_nms_stage_answers_every_request_of_the_batch_503_naming_it():
    """The detector's side of a killed NMS stage (`-m slow` kills one through Serve): every request of the
    batch gets 503 `unavailable` naming the NMS stage and its Retry-After, not a 500."""
    import asyncio

    from ray.exceptions import RayActorError

    from pipelines.serve.detector import Detector

    class LostNms:
        deployment_name = "NmsStage"

        def remote(self, batch):
            async def fail():
                raise RayActorError()
            return fail()

    stage = type("Replica", (), {"nms": LostNms(), "nms_retry_after_s": 4.0})()
    dets = Detections(torch.zeros(1, 4), torch.ones(1), torch.ones(1, dtype=torch.int64))
    items = [(None, {"score_threshold": 0.1}), (None, {"score_threshold": 0.2})]
    out = asyncio.run(Detector.func_or_class._finish(stage, items, [{"dets": dets}, {"dets": dets}]))
    assert len(out) == 2 and all(isinstance(e, ApiError) for e in out)
    assert out[0].status == 503 and out[0].code == "unavailable" and out[0].retry_after_s == 4.0
    assert "NmsStage is unavailable" in out[0].message and "RayActorError" in out[0].message


def _request(ctype: str, body: bytes):
    from starlette.requests import Request

    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/detect", "headers": headers}, receive)


@pytest.mark.parametrize("ctype", ["multipart/form-data", "Multipart/Form-Data"])
def test_a_multipart_body_gets_its_framing_slack_whatever_the_case_of_its_type(ctype):
    """Media types are case-insensitive: a file at the byte limit in a form is read however the type is spelt."""
    import asyncio

    from pipelines.serve.ingress import read_image_bytes

    data = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    body = (b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--zz--\r\n")
    assert asyncio.run(read_image_bytes(_request(f"{ctype}; boundary=zz", body), len(data))) == data


def test_an_internal_error_names_its_cause_not_rays_traceback_text():
    import asyncio
    import json

    from ray.exceptions import RayTaskError

    from pipelines.serve.ingress import _internal_error

    wrapped = RayTaskError("Detector.__call__", "Traceback (most recent call last):\n  File \"/x.py\", line 1\n"
                           "ValueError: bad shape", ValueError("bad shape\nmore detail"), pid=4242, ip="10.1.2.3")
    for error, message in ((wrapped, "ValueError: bad shape"), (KeyError("k"), "KeyError: 'k'")):
        answer = asyncio.run(_internal_error(None, error))
        body = json.loads(answer.body)
        assert answer.status_code == 500 and body["error"]["code"] == "internal", body
        assert body["error"]["message"] == message and "4242" not in answer.body.decode(), body


def test_the_health_check_takes_only_this_applications_answer():
    """Any 200 at /healthz passed: another server on the port (another cluster's endpoint) was taken for the
    application just deployed. A real HTTP server answers here."""
    import http.server
    import json
    import threading

    from pipelines.serve.deploy import DeployError, _wait_healthy

    answer = {"body": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for body in (b"<html>another server</html>", json.dumps({"status": "ok", "models": ["theirs"]}).encode()):
            answer["body"] = body
            with pytest.raises(DeployError, match="another server on the port"):
                _wait_healthy(url, 1.2, models=["mine"])
        answer["body"] = json.dumps({"status": "ok", "models": ["mine"]}).encode()
        _wait_healthy(url, 5, models=["mine"])
    finally:
        server.shutdown()


def test_serve_needs_http_and_a_port_in_range(capsys):
    """Serve's proxy_location Disabled runs no HTTP proxy: the endpoint never answered and the start waited out its
    timeout; so did a --port of 0 or 70000 (argparse took any integer)."""
    from pipelines.cli import main
    from pipelines.serve.config import HttpOptions

    with pytest.raises(ValidationError, match="proxy_location"):
        HttpOptions(proxy_location="Disabled")
    for port in ("0", "70000"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--random-weights", "--port", port])
        assert e.value.code == 2 and "must be a port 1..65535" in capsys.readouterr().err
