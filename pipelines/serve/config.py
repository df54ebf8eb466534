"""The serving configuration: one pydantic schema for the YAML, the CLI and ``pipelines.serve.deploy``.

A Serve YAML (``cluster/serve/*.yaml``) names ``pipelines.serve.app:build_app`` as its ``import_path``;
its ``args`` validate as :class:`ServeArgs`. Everything here is plain data: no Ray, no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["detection", "segmentation", "classification"]
ENDPOINT_TASK = {"detect": "detection", "segment": "segmentation", "classify": "classification"}


class _Strict(BaseModel):
    # A misspelt key in a YAML must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Serve's autoscaling: replicas between min and max, aiming at ``target_ongoing_requests`` each."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class StageResources(_Strict):
    """Replicas and resources of one deployment (stage) of a graph."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[Autoscaling] = None
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests waiting for a replica beyond this are answered 503 (overloaded) with Retry-After; unset:
    # 4 x max_ongoing_requests; -1 = unbounded (latency then grows without bound under overload).
    max_queued_requests: Optional[int] = Field(None, ge=-1)
    # The Retry-After (seconds) of those 503s, and of the 503 `unavailable` when a replica died.
    retry_after_s: float = Field(1.0, ge=0)
    # Placement across nodes: at most this many replicas on one node (2 replicas, 1 per node: a lost node
    # takes only one), and custom resources each replica holds (e.g. {"node_head": 0.01} pins it to the
    # node started with that resource).
    max_replicas_per_node: Optional[int] = Field(None, ge=1)
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded_queue(self):
        if self.max_queued_requests == 0:  # Serve takes -1 or >= 1 and would refuse it only once Ray runs
            raise ValueError("max_queued_requests: 0 is not a queue length Serve takes; -1 (unbounded) or >= 1")
        if self.max_queued_requests is None:
            self.max_queued_requests = 4 * self.max_ongoing_requests
        return self

    def replicas(self) -> int:
        """Replicas it may run (autoscaling: up to ``max_replicas``)."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    def cpus_asked(self) -> float:
        """Logical CPUs its replicas hold, all of them together."""
        return self.num_cpus * self.replicas()

    def gpus_asked(self) -> float:
        return self.num_gpus * self.replicas()

    def deployment_options(self) -> dict:
        """The keyword arguments for ``Deployment.options``."""
        opts = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            # Serve's own answer when this deployment's queue is full (503 + Retry-After).
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
        }
        if self.max_replicas_per_node is not None:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class Batching(_Strict):
    """Dynamic batching of a deployment (``pipelines.serve.batching.Batcher``): under load a batch takes
    what queued while the previous one ran, up to ``max_batch_size``; ``batch_wait_timeout_s`` is how long
    the first request reaching an idle stage waits for others (0: it runs at once)."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)


class ModelBatching(Batching):
    """A served model's batching. With ``calibrate`` its replica times the model at start on batches of 1,
    2, 4, ... up to ``max_batch_size`` and caps its batches at the size with the most images/s
    (``pipelines.serve.batching.best_batch_size``): on a CPU a full batch can run slower per image than a
    small one. Off by default (docs/serving.md: where it helps and where it did not)."""

    calibrate: bool = False


class NmsSettings(_Strict):
    """Defaults of the NMS stage; requests may override the thresholds with query parameters."""

    iou_threshold: float = Field(0.5, ge=0, le=1)
    score_threshold: float = Field(0.05, ge=0, le=1)
    max_detections: int = Field(100, ge=1, le=1000)


class ModelSpec(_Strict):
    """One served model.

    ``checkpoint`` is a run directory, a checkpoint directory, a ``.pt`` file or a storage URI
    (``s3://...``, ``gs://...``) of one of those; the task, architecture, classes and image size
    then come from the checkpoint's config. ``random_weights`` serves an untrained ``arch`` (tests,
    smoke runs) and needs ``task``, ``arch`` and ``num_classes``.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    task: Optional[Task] = None
    checkpoint: Optional[str] = None
    random_weights: bool = False
    arch: Optional[str] = None
    num_classes: Optional[int] = Field(None, ge=1)
    # Longest side fed to a detector / square side fed to a classifier; from the checkpoint when unset.
    image_size: Optional[int] = Field(None, ge=16, le=4096)
    batching: ModelBatching = Field(default_factory=ModelBatching)
    model: StageResources = Field(default_factory=lambda: StageResources(num_cpus=1.0, max_ongoing_requests=16))
    top_k: int = Field(5, ge=1, le=1000)

    @model_validator(mode="after")
    def _source(self):
        if self.checkpoint and self.random_weights:
            raise ValueError(f"model {self.name!r}: give either checkpoint or random_weights, not both")
        if self.random_weights and not (self.task and self.arch and self.num_classes):
            raise ValueError(f"model {self.name!r}: random_weights needs task, arch and num_classes")
        if self.model.max_ongoing_requests < self.batching.max_batch_size:
            # Serve can only fill a batch with requests the replica has accepted.
            raise ValueError(
                f"model {self.name!r}: model.max_ongoing_requests ({self.model.max_ongoing_requests}) must be "
                f">= batching.max_batch_size ({self.batching.max_batch_size})")
        return self


class Limits(_Strict):
    """What a request may carry and cost. Bigger bodies, images or mask answers are answered 413; a body
    that does not arrive in time, 408."""

    max_body_bytes: int = Field(10 * 2**20, ge=1)
    # Width x height read from the header before decoding: a decompression bomb never gets decoded.
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    # /v1/segment: pixels of the image as sent that the returned masks cover together (each mask over its
    # own region); 64 Mi = four full 4096 x 4096 masks. More is refused before any mask is resized.
    max_mask_pixels: int = Field(64 * 2**20, ge=1)
    # The whole body must have arrived within this many seconds of the request reaching the Ingress
    # (slow clients hold an Ingress slot while they send).
    body_timeout_s: float = Field(30.0, gt=0)


class ServeArgs(_Strict):
    """The ``args`` of the Serve application (``pipelines.serve.app:build_app``)."""

    models: list[ModelSpec] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    nms: NmsSettings = Field(default_factory=NmsSettings)
    # The NMS stage's own deployment: set num_gpus: 1 (or a fraction) to run batched_nms on a GPU.
    nms_stage: StageResources = Field(default_factory=lambda: StageResources(num_cpus=0.25))
    # Calls (one per detector batch) suppressed together.
    nms_batching: Batching = Field(default_factory=lambda: Batching(max_batch_size=32))
    # Preprocess (decode, resize) and postprocess (boxes to the image sent, masks to RLE) run in the
    # Ingress replica, in a thread each call: two hops fewer per request. false deploys them as their own
    # deployments with the resources below (to scale or place them apart from the Ingress).
    stages_in_ingress: bool = True
    preprocess: StageResources = Field(default_factory=StageResources)
    postprocess: StageResources = Field(default_factory=StageResources)
    # The Ingress holds a request while its body arrives: many slots (cheap, async) so that slow clients
    # do not crowd out others; its queue is Serve's, in front of it (docs/serving.md, Limits).
    ingress: StageResources = Field(default_factory=lambda: StageResources(
        num_cpus=0.25, max_ongoing_requests=1024, max_queued_requests=256))

    @model_validator(mode="after")
    def _nms_batches_can_fill(self):
        # As for a model: the NMS stage can only batch the calls its replica has accepted.
        if self.nms_stage.max_ongoing_requests < self.nms_batching.max_batch_size:
            raise ValueError(f"nms_stage.max_ongoing_requests ({self.nms_stage.max_ongoing_requests}) must be >= "
                             f"nms_batching.max_batch_size ({self.nms_batching.max_batch_size})")
        return self

    @field_validator("models")
    @classmethod
    def _unique(cls, models):
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        return models

    def needs_nms_stage(self) -> bool:
        """Whether a detector may be served (a model of unknown task may be one): a classifier-only
        application deploys no NMS stage."""
        return any(m.task != "classification" for m in self.models)

    def stages(self) -> dict[str, "StageResources"]:
        """Every deployment the application will have, with its resources, by where the config sets them
        (``models[<name>].model``, ``nms_stage``, ...)."""
        own = {} if self.stages_in_ingress else {"preprocess": self.preprocess, "postprocess": self.postprocess}
        nms = {"nms_stage": self.nms_stage} if self.needs_nms_stage() else {}
        return {**{f"models[{m.name}].model": m.model for m in self.models}, **nms, **own, "ingress": self.ingress}

    def cpus_asked(self) -> float:
        """Logical CPUs every deployment of the application asks for, all replicas together."""
        return sum(s.cpus_asked() for s in self.stages().values())

    def missing_weights(self) -> list[str]:
        """Names of models with neither a checkpoint nor an explicit ``random_weights``."""
        return [m.name for m in self.models if not m.checkpoint and not m.random_weights]


class HttpOptions(_Strict):
    """Serve's ``http_options`` that visionflow sets; loopback unless configured otherwise."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: Optional[float] = Field(None, gt=0)
    keep_alive_timeout_s: Optional[float] = Field(None, gt=0)
    # The Serve YAML's top-level ``proxy_location`` (HeadOnly, EveryNode); None: Serve's default. Serve's
    # Disabled (no HTTP proxy) is refused: the endpoint is HTTP, and its start waited for /healthz to time out.
    proxy_location: Optional[Literal["HeadOnly", "EveryNode"]] = None

    def serve_options(self) -> dict:
        """Serve's ``http_options`` (``proxy_location`` is its own argument of ``serve.start``)."""
        return self.model_dump(exclude_none=True, exclude={"proxy_location"})


class ServeFile(BaseModel):
    """A Serve YAML as ``serve run``/``serve deploy`` read it, restricted to what visionflow uses."""

    model_config = ConfigDict(extra="allow")
    http_options: HttpOptions = Field(default_factory=HttpOptions)
    applications: list[dict] = Field(default_factory=list)


def load_serve_file(path: str | Path) -> tuple[HttpOptions, dict, ServeArgs]:
    """Read a Serve YAML. Returns ``(http options, the application entry, its validated args)``.

    The file must hold exactly one application whose ``import_path`` is ``pipelines.serve.app:build_app``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} does not exist; expected a YAML like cluster/serve/detection.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    sf = ServeFile.model_validate(raw)
    if raw.get("proxy_location") is not None:
        sf.http_options = HttpOptions.model_validate({**sf.http_options.model_dump(exclude_none=True),
                                                      "proxy_location": raw["proxy_location"]})
    apps = [a for a in sf.applications if str(a.get("import_path", "")).startswith("pipelines.serve.app:")]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path pipelines.serve.app:build_app, "
                         f"found {len(apps)}")
    return sf.http_options, apps[0], ServeArgs.model_validate(apps[0].get("args") or {})
