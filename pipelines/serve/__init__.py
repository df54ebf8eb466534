"""Ray Serve: detection, segmentation and classification graphs over HTTP.

``deploy(config=None, *, checkpoint=None, random_weights=False, host=None, port=None) -> base URL`` and
``shutdown()``; ``pipelines.serve.app:build_app`` for ``serve run`` / ``serve deploy`` YAMLs.
"""
from pipelines.serve.config import ServeArgs, load_serve_file
from pipelines.serve.deploy import deploy, resolve_args, shutdown

__all__ = ["deploy", "shutdown", "resolve_args", "ServeArgs", "load_serve_file"]
