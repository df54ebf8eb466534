"""Builders of the Serve application, named by a Serve YAML's ``import_path``.

``build_app(args)`` binds one graph: Ingress -> Preprocess -> one model deployment per served model
(Detector or Classifier, batched; a Detector sends each batch to the NMS stage) -> Postprocess. The
stages are shared by the models;
with ``stages_in_ingress`` (the default) Preprocess and Postprocess run inside the Ingress replica.
"""
from __future__ import annotations

from ray.serve import Application

from pipelines.serve.config import ServeArgs
from pipelines.serve.detector import Classifier, Detector
from pipelines.serve.ingress import Ingress
from pipelines.serve.nms_stage import NmsStage
from pipelines.serve.postprocess import Postprocess
from pipelines.serve.preprocess import Preprocess


def _model_task(spec) -> str:
    if spec.task:
        return spec.task
    # A checkpoint without a task in the config: read it from the checkpoint (driver side, once).
    from pipelines.serve.models import load_served_model

    return load_served_model(spec)[1].task


def build_app(args: dict | ServeArgs) -> Application:
    """The application for ``args`` (a dict as in the YAML, or :class:`ServeArgs`).

    Raises ``ValueError`` when a model has neither a checkpoint nor ``random_weights``.
    """
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    if not args.models:
        raise ValueError("no models to serve: add `models:` to the config or pass --checkpoint")
    missing = args.missing_weights()
    if missing:
        raise ValueError(f"models {missing} have no checkpoint: pass `visionflow serve --checkpoint RUN_DIR` "
                         f"(a run directory, checkpoint directory or .pt file) or set `checkpoint:` in the config; "
                         f"`--random-weights` serves untrained weights (tests only)")
    specs = [m if m.task else m.model_copy(update={"task": _model_task(m)}) for m in args.models]
    args = args.model_copy(update={"models": specs})
    # One NMS stage for every detector: each sends it one call per batch.
    nms = NmsStage.options(**args.nms_stage.deployment_options()).bind(
        args.nms_batching.max_batch_size, args.nms_batching.batch_wait_timeout_s)
    models = {}
    for spec in specs:
        cls = Classifier if spec.task == "classification" else Detector
        extra = () if cls is Classifier else (nms, args.nms_stage.retry_after_s)
        models[spec.name] = cls.options(name=f"{cls.name}_{spec.name}", **spec.model.deployment_options()) \
            .bind(spec.model_dump(), *extra)
    preprocess = postprocess = None  # stages_in_ingress: the Ingress runs them itself
    if not args.stages_in_ingress:
        preprocess = Preprocess.options(**args.preprocess.deployment_options()).bind(args.limits.max_image_pixels)
        postprocess = Postprocess.options(**args.postprocess.deployment_options()).bind()
    return Ingress.options(**args.ingress.deployment_options()).bind(args.model_dump(), models, preprocess, postprocess)
