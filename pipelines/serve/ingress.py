"""Ingress deployment: the FastAPI app of the HTTP contract in docs/contracts.md, orchestrating the stages.

POST /v1/detect|segment|classify -> Preprocess -> model (batched; a detector sends each batch to the NMS
stage) -> Postprocess.
Every refusal is ``{"error": {"code", "message"}}`` with 400/408/413/415/422/503, never a 500 for bad input;
a stage whose queue is full or whose replica died answers 503 with ``Retry-After``.

The POST routes read the raw request themselves (byte limit and deadline before any parsing), so their
upload body is declared to OpenAPI by hand (:data:`IMAGE_BODY`) and their answers by the pydantic models of
``models.py``: ``/docs`` offers a file picker and shows the schemas. ``GET /`` is the page of ``page.py``.
"""
# No `from __future__ import annotations`: FastAPI must see real types on the route signatures.

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from pipelines.serve.config import ENDPOINT_TASK, ServeArgs, StageResources
from pipelines.serve.errors import (REPLICA_LOST, ApiError, bad_parameter, not_an_image, overloaded, request_timeout,
                                    too_large, unavailable)
from pipelines.serve.images import check_content_type
from pipelines.serve.models import ClassifyAnswer, DetectAnswer, ErrorAnswer, HealthAnswer, ModelsAnswer
from pipelines.serve.page import PAGE_HTML, SAMPLE_COUNT, SamplesAnswer, sample_png, samples

app = FastAPI(title="visionflow", version="0.1.0",
              description="Detection, instance segmentation and classification of the visionflow models.")


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return _error(e)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    # FastAPI's own 422 in the API's one error shape.
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
    return _error(bad_parameter("; ".join(parts) or "invalid request parameters"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    answer = _error(ApiError(e.status_code, code, str(e.detail)))
    answer.headers.update(e.headers or {})  # a 405's Allow
    return answer


@app.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception):
    # A fault of the service (not of the request): still the one JSON shape, and the replica lives on. The
    # client gets the error's type and first line; a stage's error comes wrapped in Ray's, whose text is a
    # traceback with process ids and addresses: its cause is named instead. The whole of it goes to the log.
    logging.getLogger("ray.serve").error("internal error answering a request", exc_info=e)
    cause = getattr(e, "cause", None)
    cause = cause if isinstance(cause, BaseException) else e
    first = (str(cause).strip().splitlines() or [""])[0]
    return _error(ApiError(500, "internal", f"{type(cause).__name__}: {first}"[:300]))


async def _limited(stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it grows past ``limit`` bytes."""
    chunks, n = [], 0
    async for chunk in stream:
        n += len(chunk)
        if n > limit:
            raise too_large(f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _body(request: Request, limit: int, timeout_s: Optional[float]) -> bytes:
    """The body within ``limit`` bytes (413) and ``timeout_s`` seconds (408): a client sending its body
    slowly holds an Ingress slot, so it gets a deadline whatever Serve's proxy timeout is."""
    try:
        return await asyncio.wait_for(_limited(request.stream(), limit), timeout_s)
    except asyncio.TimeoutError:
        raise request_timeout(f"the request body did not arrive within {timeout_s:g} s (limits.body_timeout_s); "
                              f"send the whole body at once") from None


async def read_image_bytes(request: Request, max_bytes: int, timeout_s: Optional[float] = None) -> bytes:
    """The image bytes of a request: the raw body, or the multipart field ``file``.

    Raises 413 (too many bytes), 415 (content type not JPEG/PNG/octet-stream/multipart), 400 (no file field),
    408 (the body took longer than ``timeout_s``).
    """
    ctype = request.headers.get("content-type", "")
    declared = request.headers.get("content-length")
    slack = 64 * 1024 if ctype.lower().startswith("multipart/") else 0  # multipart framing around the file
    if declared and declared.isdigit() and int(declared) > max_bytes + slack:
        raise too_large(f"request body is {declared} bytes; the limit is {max_bytes} bytes")
    if not ctype.lower().startswith("multipart/form-data"):
        check_content_type(ctype)
        return await _body(request, max_bytes, timeout_s)
    body = await _body(request, max_bytes + slack, timeout_s)

    async def replay():
        yield body

    try:
        form = await MultiPartParser(Headers(raw=request.headers.raw), replay(), max_files=1, max_fields=16,
                                     max_part_size=max_bytes).parse()
    except MultiPartException as e:
        raise not_an_image(f"malformed multipart body: {e.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise not_an_image("multipart body has no file field named 'file'; send the image as field 'file'")
    check_content_type(upload.content_type)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(f"file is larger than the limit of {max_bytes} bytes")
    return data


def _binary(media: str = "application/octet-stream") -> dict:
    return {"type": "string", "format": "binary", "contentMediaType": media}


# The upload of the three POST routes, as OpenAPI's requestBody: the image as the whole body, or a form with
# the field `file` (what a browser form, curl -F and /docs send). The handlers read the raw request.
IMAGE_BODY = {"requestBody": {
    "required": True,
    "description": "One JPEG or PNG image: the raw bytes, or a multipart/form-data form whose field `file` "
                   "holds them.",
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {**_binary(), "description": "the JPEG or PNG image"}}}},
        **{media: {"schema": _binary(media)} for media in ("image/jpeg", "image/png", "application/octet-stream")},
    }}}
_TIMING_HEADER = {"Server-Timing": {"description": "preprocess, model, nms (not for classify), postprocess and "
                                                   "total, in ms: `preprocess;dur=1.234, ...`",
                                    "schema": {"type": "string"}}}
_RETRY_HEADER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_ERRORS = {
    400: {"model": ErrorAnswer, "description": "`not_an_image`: not a JPEG/PNG, truncated, empty, malformed "
                                               "multipart, or no `file` field"},
    404: {"model": ErrorAnswer, "description": "`no_model`: no model of the endpoint's task is deployed"},
    408: {"model": ErrorAnswer, "description": "`request_timeout`: the body did not arrive within "
                                               "`limits.body_timeout_s`"},
    413: {"model": ErrorAnswer, "description": "`too_large`: body, pixels or (segment) mask pixels over the limits"},
    415: {"model": ErrorAnswer, "description": "`unsupported_media_type`: not JPEG, PNG, octet-stream or multipart"},
    422: {"model": ErrorAnswer, "description": "`invalid_parameter`: a query parameter out of range, or an "
                                               "unknown `model`"},
    500: {"model": ErrorAnswer, "description": "`internal`: a fault of the service; the replica stays up"},
    503: {"model": ErrorAnswer, "description": "`overloaded` or `unavailable`; see `Retry-After`",
          "headers": _RETRY_HEADER},
}


def _upload_route(answer: type, summary: str) -> dict:
    """``app.post`` keywords of an upload route: the declared body, the answer (documentation only: the
    handler returns a JSONResponse, passed through as built) and the error shape."""
    return {"summary": summary, "openapi_extra": IMAGE_BODY, "response_model": answer,
            "responses": {200: {"headers": _TIMING_HEADER}, **_ERRORS}}


class InProcess:
    """A stage object called the way a deployment handle is (``.remote(...)``, ``.method.remote(...)``), run
    in a thread of this replica: Preprocess and Postprocess inside the Ingress (``stages_in_ingress``)."""

    def __init__(self, obj, method: str = "__call__"):
        self._obj, self._method = obj, method
        self.deployment_name = f"{type(obj).__name__} (in the Ingress)"

    def remote(self, *a, **kw):
        return asyncio.to_thread(getattr(self._obj, self._method), *a, **kw)

    def __getattr__(self, name: str) -> "InProcess":
        return InProcess(self._obj, name)


def _timing(**ms: float) -> dict:
    return {"Server-Timing": ", ".join(f"{k};dur={v:.3f}" for k, v in ms.items())}


DETECT_QUERY = ("score_threshold", "iou_threshold", "max_detections", "model")
CLASSIFY_QUERY = ("top_k", "score_threshold", "max_detections", "model")


def _known_query(request: Request, allowed: tuple[str, ...]) -> None:
    """422 for a query parameter the route does not take (``score-threshold``, ``top_k`` on /v1/detect) or one
    given twice: they were ignored (the defaults applied) or the last one won, a quietly other answer."""
    names = [k for k, _ in request.query_params.multi_items()]  # keys() gives each name once
    unknown = sorted({n for n in names if n not in allowed})
    if unknown:
        raise ApiError(422, "invalid_parameter", f"unknown query parameter(s) {', '.join(unknown)}; "
                                                 f"{request.url.path} takes {', '.join(allowed)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ApiError(422, "invalid_parameter", f"query parameter(s) {', '.join(twice)} given more than once")


@serve.deployment
@serve.ingress(app)
class Ingress:
    """The HTTP front. ``models``: name -> handle of its model deployment; the stage handles are shared."""

    def __init__(self, args: dict, models: dict, preprocess, postprocess):
        self.args = ServeArgs.model_validate(args)
        self.models = models
        if preprocess is None:  # stages_in_ingress: the stages' own classes, called in a thread
            from pipelines.serve.postprocess import Postprocess
            from pipelines.serve.preprocess import Preprocess

            preprocess = InProcess(Preprocess.func_or_class(self.args.limits.max_image_pixels))
            postprocess = InProcess(Postprocess.func_or_class())
        self.preprocess, self.postprocess = preprocess, postprocess
        self.tasks = {m.name: m.task for m in self.args.models}
        self._info: dict[str, dict] = {}

    async def _describe(self, name: str) -> dict:
        if name not in self._info:
            self._info[name] = await self._call(self._stage(name), self.models[name].describe)
        return self._info[name]

    def pid(self) -> int:
        """The replica's process id (a handle method, not a route; tests read its memory from /proc)."""
        return os.getpid()

    def _stage(self, name: str) -> StageResources:
        return next(m.model for m in self.args.models if m.name == name)

    def _pick(self, task: str, model: Optional[str]) -> str:
        names = [n for n, t in self.tasks.items() if t == task]
        if not names:
            raise ApiError(404, "no_model", f"no {task} model is deployed; deployed: {sorted(self.tasks)}")
        if model is None:
            return names[0]
        if model not in names:
            raise bad_parameter(f"model: unknown {task} model {model!r}; expected one of {names}")
        return model

    async def _call(self, stage: StageResources, handle, *a, **kw):
        """``handle.remote(*a, **kw)``; a full queue or a replica that died is a 503 with Retry-After (a
        JSON answer, not Serve's 500 with internal text)."""
        try:
            return await handle.remote(*a, **kw)
        except BackPressureError as e:
            retry = e.retry_after_s if e.retry_after_s is not None else stage.retry_after_s
            # A stage called by another (the NMS stage, by the detector) comes back wrapped: name the cause.
            raise overloaded(f"the service is overloaded ({getattr(e, 'cause', None) or e}); retry later",
                             retry) from None
        except REPLICA_LOST as e:
            name = getattr(handle, "deployment_name", "a stage")
            raise unavailable(f"{name} is unavailable ({type(e).__name__}: a replica stopped while serving this "
                              f"request; Serve replaces it); retry later", stage.retry_after_s) from None

    async def _prepare(self, request: Request, name: str, square: bool):
        info = await self._describe(name)
        limits = self.args.limits
        data = await read_image_bytes(request, limits.max_body_bytes, limits.body_timeout_s)
        prep = await self._call(self.args.preprocess, self.preprocess, data, info["image_size"], square)
        if isinstance(prep, ApiError):
            raise prep
        return info, prep

    async def _detect(self, request: Request, task: str, model, score_threshold, iou_threshold, max_detections):
        t0 = time.perf_counter()
        name = self._pick(task, model)
        info, prep = await self._prepare(request, name, square=False)
        nms = self.args.nms
        # The model deployment runs the NMS stage on each batch it ran; the answer holds the kept ones.
        kept = await self._call(self._stage(name), self.models[name], prep["image"], {
            "iou_threshold": nms.iou_threshold if iou_threshold is None else iou_threshold,
            "score_threshold": nms.score_threshold if score_threshold is None else score_threshold,
            "max_detections": nms.max_detections if max_detections is None else max_detections})
        if isinstance(kept, ApiError):  # the NMS stage's replica died during the batch's call
            raise kept
        post = await self._call(self.args.postprocess, self.postprocess.detections, kept["dets"],
                                tuple(prep["image"].shape[-2:]), prep["size"], info["categories"],
                                self.args.limits.max_mask_pixels)
        if isinstance(post, ApiError):  # e.g. the masks would cover more than limits.max_mask_pixels
            raise post
        w, h = prep["size"]
        body = {"model": name, "task": task, "image": {"width": w, "height": h}, "detections": post["items"]}
        total = (time.perf_counter() - t0) * 1e3
        return JSONResponse(body, headers=_timing(preprocess=prep["ms"], model=kept["ms"], nms=kept["nms_ms"],
                                                  postprocess=post["ms"], total=total))

    @app.post("/v1/detect",
              **_upload_route(DetectAnswer, "Detect objects in a JPEG/PNG (raw body or multipart field `file`)"))
    async def detect(self, request: Request,
                     score_threshold: Optional[float] = Query(None, ge=0, le=1),
                     iou_threshold: Optional[float] = Query(None, ge=0, le=1),
                     max_detections: Optional[int] = Query(None, ge=1, le=1000),
                     model: Optional[str] = Query(None, max_length=64)):
        _known_query(request, DETECT_QUERY)
        return await self._detect(request, "detection", model, score_threshold, iou_threshold, max_detections)

    @app.post("/v1/segment", **_upload_route(DetectAnswer, "Instance masks (COCO RLE) of a JPEG/PNG"))
    async def segment(self, request: Request,
                      score_threshold: Optional[float] = Query(None, ge=0, le=1),
                      iou_threshold: Optional[float] = Query(None, ge=0, le=1),
                      max_detections: Optional[int] = Query(None, ge=1, le=1000),
                      model: Optional[str] = Query(None, max_length=64)):
        _known_query(request, DETECT_QUERY)
        return await self._detect(request, "segmentation", model, score_threshold, iou_threshold, max_detections)

    @app.post("/v1/classify", **_upload_route(ClassifyAnswer, "Top-k classes of a JPEG/PNG"))
    async def classify(self, request: Request,
                       top_k: Optional[int] = Query(None, ge=1, le=1000),
                       score_threshold: Optional[float] = Query(None, ge=0, le=1),
                       max_detections: Optional[int] = Query(None, ge=1, le=1000, description="alias of top_k"),
                       model: Optional[str] = Query(None, max_length=64)):
        _known_query(request, CLASSIFY_QUERY)
        if top_k is not None and max_detections is not None and top_k != max_detections:
            raise ApiError(422, "invalid_parameter", f"top_k={top_k} and its alias max_detections={max_detections} "
                                                     "disagree: give one of them")
        t0 = time.perf_counter()
        name = self._pick("classification", model)
        info, prep = await self._prepare(request, name, square=True)
        out = await self._call(self._stage(name), self.models[name], prep["image"])
        spec = next(m for m in self.args.models if m.name == name)
        k = top_k or max_detections or spec.top_k
        post = await self._call(self.args.postprocess, self.postprocess.classes, out["probs"], k, info["categories"])
        items = [p for p in post["items"] if score_threshold is None or p["score"] >= score_threshold]
        w, h = prep["size"]
        total = (time.perf_counter() - t0) * 1e3
        return JSONResponse({"model": name, "task": "classification", "image": {"width": w, "height": h},
                             "predictions": items},
                            headers=_timing(preprocess=prep["ms"], model=out["ms"], postprocess=post["ms"], total=total))

    @app.get("/v1/models", summary="The deployed models", responses={200: {"model": ModelsAnswer}})
    async def list_models(self):
        return {"models": [await self._describe(n) for n in self.tasks]}

    @app.get("/healthz", summary="Liveness", responses={200: {"model": HealthAnswer}})
    async def healthz(self):
        return {"status": "ok", "models": sorted(self.tasks)}

    @app.get("/", summary="A page to try the models in a browser", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(PAGE_HTML)

    @app.get("/v1/samples", summary="Sample images (built-in shapes) for the page",
             responses={200: {"model": SamplesAnswer}})
    async def list_samples(self):
        return samples()

    @app.get("/v1/samples/{n}.png", summary="One sample image (PNG)", response_class=Response,
             responses={200: {"content": {"image/png": {"schema": _binary("image/png")}}},
                        404: {"model": ErrorAnswer}, 422: {"model": ErrorAnswer}})
    async def sample(self, n: int):
        if not 0 <= n < SAMPLE_COUNT:
            raise ApiError(404, "not_found", f"no sample {n}; there are {SAMPLE_COUNT} (0..{SAMPLE_COUNT - 1})")
        png = await asyncio.to_thread(sample_png, n)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
