"""The run configuration (``visionflow run --config FILE``): one pydantic schema over the stage configs.

A YAML file sets ``run_dir`` and one section per stage: ``data``, ``train``, ``eval``, ``compare``,
``deploy``, ``smoke``, ``robustness``. Unknown keys are errors (a misspelt key must not be ignored).
The training section composes the trainer's own schema (``pipelines.train.config.TrainConfig``):
``train.defaults`` for every architecture, ``train.per_task`` and ``train.per_arch`` on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASKS = ("classification", "localization", "detection", "segmentation")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthData(_Strict):
    """The built-in shapes dataset (``vision.data.synth.write_synth``)."""

    images: int = Field(200, ge=4)
    size: int = Field(128, ge=32, le=4096)
    seed: int = 0
    val_fraction: float = Field(0.2, gt=0, lt=1)


class CocoSplit(_Strict):
    """One split of a COCO-layout dataset: the annotation JSON and the image directory (paths or URIs)."""

    annotations: str
    images: str


class DataStage(_Strict):
    source: Literal["synth", "coco"] = "synth"
    synth: SynthData = Field(default_factory=SynthData)
    train: Optional[CocoSplit] = None
    val: Optional[CocoSplit] = None

    @model_validator(mode="after")
    def _coco_needs_splits(self):
        if self.source == "coco" and not (self.train and self.val):
            raise ValueError("data.source is coco: set data.train and data.val, each {annotations, images}")
        return self

    def identity(self) -> dict:
        """What the data depends on (the synth settings are irrelevant for COCO and vice versa). For COCO
        that is the content, not only the paths: each annotation JSON's size, mtime and hash and each
        image folder's file count, bytes and newest mtime (``pipelines.storage.fingerprint``), so files
        changed in place make the data stage run again."""
        if self.source == "synth":
            return {"source": "synth", "synth": self.synth.model_dump()}
        from pipelines.storage import fingerprint

        return {"source": "coco", **{split: {**s.model_dump(), "content": {"annotations": fingerprint(s.annotations),
                                                                       "images": fingerprint(s.images)}}
                                     for split, s in (("train", self.train), ("val", self.val))}}


class TrainStage(_Strict):
    """Which architectures to train and with what settings."""

    # None: every architecture in the registry (``visionflow models``).
    archs: Optional[list[str]] = None
    exclude: list[str] = Field(default_factory=list)
    # TrainConfig fields for every architecture, then per task, then per architecture (the last wins).
    defaults: dict = Field(default_factory=dict)
    per_task: dict[str, dict] = Field(default_factory=dict)
    per_arch: dict[str, dict] = Field(default_factory=dict)
    # How many architectures train at once (lanes); the cluster's resources are the other limit, since
    # every run waits for its workers' CPUs/GPUs.
    max_parallel: int = Field(2, ge=1)
    # A lane's single-worker trainings share one Ray Train run, one after another on one warm worker
    # (pipelines/train/lane.py); false: each training is its own Ray Train run.
    share_workers: bool = True
    # When the cluster is too small for one training: seconds to wait for an autoscaling cluster to add
    # nodes (after asking it for them) before refusing; 0 refuses at once.
    placement_wait_s: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _tasks_known(self):
        bad = sorted(set(self.per_task) - set(TASKS))
        if bad:
            raise ValueError(f"train.per_task has unknown tasks {bad}; expected some of {list(TASKS)}")
        return self


class EvalStage(_Strict):
    enabled: bool = True
    # The metrics of a training's last validation pass (the same checkpoint on the same val split) instead
    # of a second pass; the checkpoint is still loaded and its inference speed measured. False: evaluate again.
    from_training: bool = True
    # Ray resources of each evaluation task (a GPU makes COCO eval of a big detector much faster).
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class CompareStage(_Strict):
    enabled: bool = True


class DeployStage(_Strict):
    """Serve detection + segmentation from the best checkpoints of the run."""

    enabled: bool = True
    # None: the architecture of that task with the best evaluation metric in this run.
    detection_arch: Optional[str] = None
    segmentation_arch: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Serve's HTTP options, as in a Serve YAML: the end-to-end request timeout (a client that sends its
    # body slowly is cut off) and where proxies run (HeadOnly, EveryNode; Serve's Disabled is refused: the
    # endpoint, its health check and the smoke test are HTTP).
    request_timeout_s: Optional[float] = Field(None, gt=0)
    proxy_location: Optional[Literal["HeadOnly", "EveryNode"]] = None
    # Seconds to wait for the application to be up before the stage fails with each deployment's state.
    timeout_s: float = Field(300.0, gt=0)
    # Extra ServeArgs fields (nms, limits, per-stage resources) merged into the generated application.
    serve: dict = Field(default_factory=dict)
    # Keep serving after the run ends (the driver waits for Ctrl-C); on a cluster the Serve
    # application outlives the job anyway.
    keep_serving: bool = False


class SmokeStage(_Strict):
    """After deploying: send a few val images to the endpoint and print what it found."""

    enabled: bool = True
    images: int = Field(3, ge=1, le=100)
    score_threshold: float = Field(0.3, ge=0, le=1)
    timeout_s: float = Field(60.0, gt=0)
    # Tasks whose endpoint must find at least one object in those images (at score_threshold): a model
    # that was trained to find them and finds nothing fails the stage. Empty: only that each one answers.
    expect_objects: list[Literal["detection", "segmentation"]] = Field(default_factory=list)


class RobustnessStage(_Strict):
    """Optional: robustness curves and layer visualizations for classifiers, linked from the report."""

    enabled: bool = False
    # None: every classifier of the run that trained.
    archs: Optional[list[str]] = None
    epsilons: list[float] = Field(default_factory=lambda: [0.0, 2 / 255, 8 / 255], min_length=1)
    images: int = Field(64, ge=1)
    visualize: bool = True


class RunConfig(_Strict):
    """The whole run. ``run_dir`` is a local path or a URI (``s3://bucket/prefix``)."""

    name: str = "visionflow"
    run_dir: str = "runs/quickstart"
    # Ray's address when not inside a job: None starts a local cluster (or joins RAY_ADDRESS).
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs of a locally started cluster
    data: DataStage = Field(default_factory=DataStage)
    train: TrainStage = Field(default_factory=TrainStage)
    eval: EvalStage = Field(default_factory=EvalStage)
    compare: CompareStage = Field(default_factory=CompareStage)
    deploy: DeployStage = Field(default_factory=DeployStage)
    smoke: SmokeStage = Field(default_factory=SmokeStage)
    robustness: RobustnessStage = Field(default_factory=RobustnessStage)

    def archs(self) -> list[str]:
        """The architectures this run trains, in registry order; unknown names raise ValueError."""
        from vision.models import list_models

        known = list_models()
        wanted = list(self.train.archs) if self.train.archs is not None else known
        unknown = sorted(set(wanted) - set(known)) + sorted(set(self.train.exclude) - set(known))
        unknown += sorted(set(self.train.per_arch) - set(known))
        if unknown:
            raise ValueError(f"unknown architectures {unknown} in the train section; "
                             f"known (visionflow models): {', '.join(known)}")
        return [a for a in dict.fromkeys(wanted) if a not in set(self.train.exclude)]

    def train_settings(self, arch: str) -> dict:
        """The trainer's settings for ``arch``: defaults, then per task, then per architecture."""
        from vision.models import model_task

        task = model_task(arch)
        return {**self.train.defaults, **self.train.per_task.get(task, {}), **self.train.per_arch.get(arch, {}),
                "task": task, "arch": arch}

    def check_deploy_settings(self) -> None:
        """With deploy enabled: the architectures it is told to serve are trained by this run and of the
        right kind, and ``deploy.serve`` is a valid part of a Serve application; ValueError naming what is
        wrong, before anything runs (not after every training)."""
        if not self.deploy.enabled:
            return
        from pipelines.serve.config import Batching, ServeArgs, StageResources
        from vision.models import get_entry

        archs = self.archs()
        for task, arch in (("detection", self.deploy.detection_arch), ("segmentation", self.deploy.segmentation_arch)):
            if arch is None:
                continue
            entry = get_entry(arch) if arch in archs else None
            if entry is None:
                raise ValueError(f"deploy.{task}_arch: {arch!r} is not trained by this run (its architectures: "
                                 f"{', '.join(archs)}): train it too, choose another with --set "
                                 f"deploy.{task}_arch=ARCH (null: the run's best), or pass --no-deploy")
            if entry.task != task or (task == "segmentation" and entry.segmentation != "instance"):
                kind = entry.task if entry.task != "segmentation" else f"{entry.segmentation} segmentation"
                raise ValueError(f"deploy.{task}_arch: {arch!r} is a {kind} model; the endpoint serves "
                                 f"{'instance segmentation' if task == 'segmentation' else task} models")
        serve = dict(self.deploy.serve)
        if "models" in serve:  # it passed the schema and was then replaced by the run's chosen checkpoints
            raise ValueError("deploy.serve.models: the run serves the models it trained (deploy.detection_arch, "
                             "deploy.segmentation_arch); set what each gets under deploy.serve.model")
        # deploy.serve.model: every served model's resources; the rest: ServeArgs' other fields.
        for where, schema, doc in (("deploy.serve.model", StageResources, serve.pop("model", {})),
                                   ("deploy.serve", ServeArgs, serve)):
            try:
                checked = schema.model_validate(doc)
            except ValidationError as e:
                lines = [f"  {where}.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
                raise ValueError(f"invalid {where} settings:\n" + "\n".join(lines)) from None
            if where == "deploy.serve.model" and doc.get("max_ongoing_requests") is not None \
                    and checked.max_ongoing_requests < Batching().max_batch_size:  # ModelSpec's rule, at deploy
                raise ValueError(f"deploy.serve.model.max_ongoing_requests ({checked.max_ongoing_requests}) must be >= "
                                 f"a served model's batch size ({Batching().max_batch_size})")

    def check_run_settings(self) -> None:
        """What the stages' own schemas cannot see, before anything runs; ValueError, one line each: the run
        directory inside a COCO images folder (the data's fingerprint covers that folder, so every rerun saw
        new data: ingest, every training from scratch, the old outputs set aside), robustness architectures
        that this run does not train as classifiers (a typo ended the run with exit 0 and a wrong message)."""
        import os

        from vision.models import model_task

        if self.data.source == "coco" and "://" not in self.run_dir:
            run = os.path.realpath(os.path.expanduser(self.run_dir))
            for split in (self.data.train, self.data.val):
                images = split.images
                if "://" not in images and (run + "/").startswith(os.path.realpath(os.path.expanduser(images)) + "/"):
                    raise ValueError(f"run_dir {self.run_dir} is inside the images folder {images}, whose contents "
                                     "are the data's fingerprint: every rerun would ingest and train again; put the "
                                     "run directory elsewhere")
        if self.robustness.enabled and self.robustness.archs is not None:
            classifiers = [a for a in self.archs() if model_task(a) == "classification"]
            wrong = [a for a in self.robustness.archs if a not in classifiers]
            if wrong:
                raise ValueError(f"robustness.archs: {wrong} are not classifiers this run trains (its classifiers: "
                                 f"{', '.join(classifiers) or 'none'})")

    def check_train_settings(self) -> None:
        """Validate every architecture's settings against the trainer's schema before anything runs;
        raises ValueError naming the architecture and the field."""
        from pipelines.train.config import TrainConfig

        for arch in self.archs():
            try:
                TrainConfig.model_validate({**self.train_settings(arch), "data": "-", "out": "-"})
            except ValidationError as e:
                lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
                raise ValueError(f"train settings of {arch} (train.defaults / per_task / per_arch):\n"
                                 + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read a run YAML (None: the packaged quickstart) and apply ``overrides`` (dotted keys, e.g.
    ``{"run_dir": "/tmp/r", "train.archs": ["resnet18"]}``). Raises ValueError naming the bad field."""
    path = Path(path) if path else Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; expected a YAML like pipelines/configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections (run_dir, data, train, ...), got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section (`train:` with nothing under it)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                where = ".".join(parents[:depth + 1])
                raise ValueError(f"{path}: cannot set {dotted}: {where} is {type(node).__name__} {node!r} in the "
                                 f"config, not a section")
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()]
        raise ValueError(f"{path}: invalid run config\n" + "\n".join(lines)) from None
