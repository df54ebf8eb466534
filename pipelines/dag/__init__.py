"""The workflow DAG behind ``visionflow run``: stages bound with Ray's DAG API, made durable by stage
records in the run directory (local path or ``s3://``), so a rerun resumes where a run stopped.

``load_config(path) -> RunConfig``, ``build_dag(cfg)``, ``runner.run(cfg) -> summary``.
"""
from pipelines.dag.config import RunConfig, load_config

__all__ = ["RunConfig", "load_config"]
