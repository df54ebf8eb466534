"""Serving holds under hostile clients: bounded work per request, against a real Serve deployment.

- /v1/segment pastes each mask over its own region only (no N x H x W floats): a 4096 x 4096 image
  with 100 masks keeps the Postprocess replica's peak memory small; past `limits.max_mask_pixels`: 413.
- Slow bodies get 408 JSON from the Ingress (`limits.body_timeout_s`), and 300 of them do not stop a
  normal request; Serve's own request timeout answers 408 too (text, not JSON).
- Every queue is bounded: a full one answers 503 JSON with Retry-After; a replica killed mid-request
  (a detector's, or the NMS stage's while a detector waits on it) gives 503 `unavailable` JSON naming the
  stage that died, and Serve's replacement serves the next requests.
Random weights and tiny model inputs throughout; the slow clients are raw sockets on loopback.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.serve.errors import ApiError
from pipelines.serve.postprocess import masks_to_rles

PORT = 8464
REQUEST_TIMEOUT_S = 60.0  # Serve's proxy (http_options.request_timeout_s)
BODY_TIMEOUT_S = 4.0  # the Ingress's own deadline for the body
ARGS = {
    "models": [
        {"name": "mask", "task": "segmentation", "arch": "maskrcnn_resnet18_fpn", "num_classes": 3,
         "random_weights": True, "image_size": 64, "model": {"num_cpus": 0.2, "max_ongoing_requests": 8}},
        # A detector that waits 3 s to fill a batch of 4: requests sit in it long enough to fill its
        # queue, to outlast a short timeout, or to be in flight when its replica is killed.
        {"name": "slow", "task": "detection", "arch": "ssdlite_mobilenet_v3", "num_classes": 3,
         "random_weights": True, "image_size": 64, "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 3.0},
         "model": {"num_cpus": 0.2, "max_ongoing_requests": 4, "max_queued_requests": 2, "retry_after_s": 3}},
    ],
    # Masks of up to 100 whole 4096 x 4096 images: the big request below is served, not refused.
    "limits": {"max_mask_pixels": 100 * 4096 * 4096, "body_timeout_s": BODY_TIMEOUT_S},
    "nms": {"score_threshold": 0.0, "iou_threshold": 0.5, "max_detections": 20},
    # Preprocess and Postprocess as their own deployments (the other serve tests run them in the Ingress):
    # the big request's memory is measured in the replica that pastes the masks, apart from the Ingress.
    "stages_in_ingress": False,
    "preprocess": {"num_cpus": 0.1}, "postprocess": {"num_cpus": 0.1}, "nms_stage": {"num_cpus": 0.1},
    # The Ingress keeps its defaults (1024 slots): the slow clients below rely on them.
}


# -- the encoder, without Ray ---------------------------------------------------------------------

def _full_size_rles(masks: torch.Tensor, h: int, w: int) -> list[dict]:
    """What Postprocess did before: every mask resized to the whole image, then pycocotools."""
    m = torch.nn.functional.interpolate(masks.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)
    return [mask_utils.encode(np.asfortranarray((x[0] > 0.5).numpy().astype(np.uint8))) for x in m]


def test_region_rles_equal_full_size_ones():
    rng = np.random.default_rng(0)
    for trial in range(40):
        hin, win = (int(v) for v in rng.integers(3, 40, 2))
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        masks = torch.zeros(6, hin, win)
        for k in range(4):
            y0, x0 = int(rng.integers(0, hin)), int(rng.integers(0, win))
            y1, x1 = int(rng.integers(y0, hin + 1)), int(rng.integers(x0, win + 1))
            masks[k, y0:y1, x0:x1] = torch.from_numpy(rng.random((y1 - y0, x1 - x0))).float()
        masks[4] = 1.0  # all of the image: runs continue from one column into the next
        masks[5, hin - 1, win - 1] = 0.9  # the last pixel: a run that ends the image
        masks = masks.half()  # as the detector ships them
        got = masks_to_rles(masks, (w, h))
        for a, b in zip(got, _full_size_rles(masks, h, w)):
            assert a["size"] == [h, w]
            mine = mask_utils.decode({"size": a["size"], "counts": a["counts"].encode()})
            # Equal here; a pixel at exactly 0.5 may round either way on another CPU's kernels.
            assert (mine != mask_utils.decode(b)).sum() <= max(2, h * w // 1000), (trial, (hin, win), (h, w))


def test_mask_pixel_limit_is_checked_before_pasting():
    masks = torch.zeros(3, 32, 32, dtype=torch.float16)
    masks[:, 2:30, 2:30] = 1.0  # three regions of about 3600 x 3600 pixels at 4096 x 4096
    with pytest.raises(ApiError) as e:
        masks_to_rles(masks, (4096, 4096), max_pixels=4096 * 4096)
    assert e.value.status == 413 and "limits.max_mask_pixels" in e.value.message
    assert "max_detections" in e.value.message and "score_threshold" in e.value.message
    assert len(masks_to_rles(masks, (4096, 4096), max_pixels=3 * 4096 * 4096)) == 3
    assert masks_to_rles(torch.zeros(1, 8, 8), (50, 40), max_pixels=1)[0]["counts"] == mask_utils.encode(
        np.zeros((40, 50), np.uint8, order="F"))["counts"].decode()


def test_whole_image_masks_peak_memory_is_one_region_not_all():
    """The worst case the model of the Serve tests cannot produce: every mask covers all of a 4096 x 4096
    image. Peak traced allocations stay at one region's worth (bools and a float chunk), not N x H x W."""
    import tracemalloc

    masks = torch.full((6, 64, 64), 0.9, dtype=torch.float16)
    masks[:, 20:40, 20:40] = 0.1  # a hole: a few runs per column
    tracemalloc.start()
    try:
        rles = masks_to_rles(masks, (4096, 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rles) == 6
    area = int(mask_utils.area({"size": rles[0]["size"], "counts": rles[0]["counts"].encode()}))
    assert 4096 * 4096 * 0.8 < area < 4096 * 4096
    print(f"peak traced memory for 6 whole-image masks at 4096 x 4096: {peak / 2**20:.0f} MiB")
    assert peak < 120 * 2**20, peak  # one float32 mask alone is 64 MiB; six were 384 MiB


# -- against Serve ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def url(ray_cluster):
    from pipelines.serve import deploy, shutdown
    from pipelines.serve.config import HttpOptions

    base = deploy(ARGS, port=PORT, http_options=HttpOptions(request_timeout_s=REQUEST_TIMEOUT_S))
    yield base
    shutdown()


def _handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="visionflow")


def _image(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth image with a few blocks: small as a JPEG even at 4096 x 4096."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, 96)], -1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x, y = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        arr[y:y + h // 5, x:x + w // 5] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, fmt, quality=85)
    return buf.getvalue()


def _post(url, path, data, ctype="image/jpeg", timeout=120, headers=None, **params):
    return requests.post(f"{url}{path}", data=data, params=params, timeout=timeout,
                         headers={"content-type": ctype, **(headers or {})})


def _assert_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]["message"]


def _memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS since the last reset) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
        f.write("5")


def test_big_segment_request_keeps_memory_small(url):
    """4096 x 4096, every candidate kept (score 0, no suppression), 100 masks: the old Postprocess asked
    for 100 x 4096 x 4096 float32 (6.4 GiB); pasting each mask over its region keeps the peak small."""
    pids = {name: _handle(name).pid.remote().result() for name in ("Postprocess", "Ingress", "Preprocess")}
    before = {}
    for name, pid in pids.items():
        _reset_peak(pid)
        before[name] = _memory_kb(pid)
    body = _image(4096, 4096)
    t0 = time.perf_counter()
    r = _post(url, "/v1/segment", body, score_threshold=0, iou_threshold=1, max_detections=100, timeout=300)
    seconds = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:500]
    dets = r.json()["detections"]
    assert 50 <= len(dets) <= 100
    covered = sum(int(mask_utils.area({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}))
                  for d in dets)
    growth = {}
    for name, pid in pids.items():
        after = _memory_kb(pid)
        growth[name] = (after["VmHWM"] - before[name]["VmRSS"]) / 1024
        print(f"{name}: RSS {before[name]['VmRSS'] / 1024:.0f} MiB before, peak {after['VmHWM'] / 1024:.0f} MiB "
              f"during, RSS {after['VmRSS'] / 1024:.0f} MiB after (+{growth[name]:.0f} MiB peak)")
    print(f"{len(dets)} masks, {covered} mask pixels set, body {len(body)} bytes, answer {len(r.content)} bytes, "
          f"{seconds:.1f} s; server-timing {r.headers['server-timing']}")
    m = mask_utils.decode({"size": dets[0]["mask"]["size"], "counts": dets[0]["mask"]["counts"].encode()})
    assert m.shape == (4096, 4096)
    # One float32 mask at this size is 64 MiB; all of them at once were 6.4 GiB.
    assert growth["Postprocess"] < 300, growth
    assert growth["Ingress"] < 400 and growth["Preprocess"] < 400, growth


def test_segment_still_answers_small_images(url):
    r = _post(url, "/v1/segment", _image(90, 70, fmt="PNG"), "image/png", max_detections=5)
    assert r.status_code == 200, r.text
    for d in r.json()["detections"]:
        m = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
        assert m.shape == (70, 90)


def _slow_client(path: str, declared: int, extra_headers: str = "") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", PORT), timeout=30)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nContent-Type: image/jpeg\r\n"
               f"Content-Length: {declared}\r\n{extra_headers}\r\n").encode())
    return s


def _read_answer(s: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of the HTTP answer on a raw socket (Content-Length bodies)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", len(rest)))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def test_slow_bodies_get_408_and_do_not_block_a_normal_request(url):
    """300 clients send headers, then one byte a second: each holds an Ingress slot until the body deadline
    cuts it off (408 JSON), and a normal request meanwhile is answered within seconds. One of them turns
    Serve's own timeout off (the `x-request-timeout-seconds: 0` header Serve 2.60 honours): the Ingress's
    deadline holds anyway."""
    n, declared = 300, 100_000
    clients = [_slow_client("/v1/segment", declared) for _ in range(n - 1)]
    clients.append(_slow_client("/v1/segment", declared, "x-request-timeout-seconds: 0\r\n"))
    start = time.monotonic()
    stop = threading.Event()
    sent = {"bytes": 0, "closed": 0}

    def trickle():  # one byte a second on each socket until the server answers or closes it
        while not stop.is_set() and time.monotonic() - start < 4 * BODY_TIMEOUT_S:
            for s in clients:
                try:
                    s.send(b"\xff")
                    sent["bytes"] += 1
                except OSError:
                    sent["closed"] += 1
            stop.wait(1.0)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(1.5)  # every slow request has reached the Ingress and waits for its body
        latencies = []
        for i in range(2):
            t0 = time.monotonic()
            r = _post(url, "/v1/segment", _image(80, 60, seed=i), max_detections=3, timeout=60)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
        print(f"normal requests amid {n} slow clients: {[round(x, 2) for x in latencies]} s")
        assert max(latencies) < 6.0, latencies
        answers = []
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(_read_answer, clients))
        took = time.monotonic() - start
    finally:
        stop.set()
        t.join(10)
        for s in clients:
            s.close()
    statuses = [a[0] for a in answers]
    print(f"slow clients answered after {took:.1f} s: { {s: statuses.count(s) for s in set(statuses)} }; "
          f"{sent['bytes']} bytes trickled")
    assert statuses == [408] * n, statuses
    for status, headers, body in answers:
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"]["code"] == "request_timeout"
    assert took < BODY_TIMEOUT_S + 20
    assert _post(url, "/v1/segment", _image(80, 60), max_detections=3).status_code == 200


def test_serve_request_timeout_answers_408_text(url):
    """Serve cuts a request still running after its timeout with 408 and a plain-text body (Serve's
    answer, not the API's JSON); here the client asks for 0.5 s while the detector waits 3 s for a batch."""
    r = _post(url, "/v1/detect", _image(64, 48), model="slow", headers={"x-request-timeout-seconds": "0.5"},
              timeout=60)
    assert r.status_code == 408, r.text
    assert r.headers["content-type"].startswith("text/plain") and "timed out" in r.text
    assert _post(url, "/v1/detect", _image(64, 48), model="slow").status_code == 200


def test_full_queue_answers_503_json_with_retry_after(url):
    def post(i):
        return _post(url, "/v1/detect", _image(64, 48, seed=i), model="slow", timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(16)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 4, codes
    for r in answers:
        if r.status_code == 503:
            _assert_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "3"
    assert post(99).status_code == 200


def test_killed_replica_answers_503_then_serve_replaces_it(url):
    """SIGKILL the detector replica while a request waits in its batch: 503 `unavailable` JSON (not a 500
    with internal text); once Serve has started a new replica, requests succeed again."""
    handle = _handle("Detector_slow")
    pid = handle.pid.remote().result()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, "/v1/detect", _image(64, 48), "image/jpeg", 120, None, model="slow")
        time.sleep(1.5)  # the request now waits in the replica for its batch to fill (3 s)
        os.kill(pid, signal.SIGKILL)
        r = pending.result()
    message = _assert_error(r, 503, "unavailable")
    assert "Detector_slow" in message and "Traceback" not in r.text
    assert int(r.headers["retry-after"]) >= 1
    t0 = time.monotonic()
    codes = []
    while time.monotonic() - t0 < 120:
        r = _post(url, "/v1/detect", _image(64, 48), model="slow", timeout=60)
        codes.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] in ("unavailable", "overloaded"), r.text
        time.sleep(1.0)
    print(f"replaced in {time.monotonic() - t0:.1f} s; answers meanwhile: {codes}")
    assert codes[-1] == 200, codes
    assert handle.pid.remote().result() != pid
    # The other models were never touched.
    assert _post(url, "/v1/segment", _image(80, 60), max_detections=3).status_code == 200


NMS_WAIT_S = 3.0  # the redeployed NMS stage waits this long to fill a batch


@pytest.fixture(scope="module")
def redeployed(url):
    """The application redeployed once, for the module's last tests: a 1 Mi mask-pixel limit, and an NMS
    stage that waits NMS_WAIT_S to fill a batch, so a detector's call to it is in flight long enough to kill
    its replica."""
    from pipelines.serve import deploy
    from pipelines.serve.config import HttpOptions

    replaced = ("Ingress", "NmsStage")  # the two whose arguments change
    old = {d: _handle(d).pid.remote().result() for d in replaced}
    deploy({**ARGS, "limits": {**ARGS["limits"], "max_mask_pixels": 2**20},
            "nms_batching": {"max_batch_size": 32, "batch_wait_timeout_s": NMS_WAIT_S}}, port=PORT,
           http_options=HttpOptions(request_timeout_s=REQUEST_TIMEOUT_S))
    # A rolling update can still be draining the old replicas when deploy returns: wait until only the new
    # ones answer this process's handles and no old one is left for the HTTP proxy, whose own router learns
    # of the change on its own (a request through it was once answered by the old Ingress, without the
    # new limit).
    from ray import serve

    def stopping() -> int:
        states = serve.status().applications["visionflow"].deployments
        return sum(states[d].replica_states.get("STOPPING", 0) for d in replaced)

    deadline, streak = time.monotonic() + 120, 0
    while streak < 3 and time.monotonic() < deadline:
        fresh = all(_handle(d).pid.remote().result() != old[d] for d in replaced) and stopping() == 0
        streak = streak + 1 if fresh else 0
        time.sleep(0.5)
    assert streak == 3, f"{replaced} were not replaced with the new arguments"
    return url


@pytest.mark.slow  # (37 s with the redeploy) make test: the limit's check and message in test_mask_pixel_limit_is_checked_before_pasting
def test_mask_pixel_limit_answers_413_json(redeployed):
    """Past `limits.max_mask_pixels` (here 1 Mi; each mask's region at 4096 x 4096 is at least 128 x 128
    pixels, so 100 masks need more): 413 JSON naming the limit and how to ask for less; the same ask on a
    smaller image is served."""
    url = redeployed
    ask = {"score_threshold": 0, "iou_threshold": 1, "max_detections": 100}
    r = _post(url, "/v1/segment", _image(4096, 4096), timeout=300, **ask)
    message = _assert_error(r, 413, "too_large")
    assert "limits.max_mask_pixels = 1048576" in message
    assert "max_detections" in message and "score_threshold" in message
    print(message)
    r = _post(url, "/v1/segment", _image(100, 100), **ask)  # 100 masks of at most 100 x 100 pixels
    assert r.status_code == 200 and r.json()["detections"], r.text[:300]


@pytest.mark.slow  # make test kills a detector replica mid-request (test_killed_replica_answers_503_then_serve_replaces_it)
def test_killed_nms_stage_answers_503_naming_it(redeployed):
    """SIGKILL the NMS stage's replica while a segmenter's batch waits in it: 503 `unavailable` JSON that
    names the NMS stage (the detector that called it is alive), then Serve's replacement serves again."""
    url = redeployed
    handle = _handle("NmsStage")
    pid = handle.pid.remote().result()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, "/v1/segment", _image(80, 60), "image/jpeg", 120, None, max_detections=3)
        time.sleep(NMS_WAIT_S / 2)  # the model ran (64-pixel input); its NMS call waits for a batch to fill
        os.kill(pid, signal.SIGKILL)
        r = pending.result()
    message = _assert_error(r, 503, "unavailable")
    assert "NmsStage" in message and "Detector" not in message and "Traceback" not in r.text, message
    assert int(r.headers["retry-after"]) >= 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        r = _post(url, "/v1/segment", _image(80, 60), max_detections=3, timeout=60)
        if r.status_code == 200:
            break
        assert r.json()["error"]["code"] in ("unavailable", "overloaded"), r.text
        time.sleep(1.0)
    print(f"NMS stage replaced in {time.monotonic() - t0:.1f} s")
    assert r.status_code == 200, r.text
    assert handle.pid.remote().result() != pid
