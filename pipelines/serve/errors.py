"""The one error shape of the HTTP API: ``{"error": {"code": ..., "message": ...}}`` with a status."""
from __future__ import annotations

import math
from typing import Optional

from ray.exceptions import OutOfMemoryError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

# What a call to another deployment raises when the replica serving it stopped (killed, out of memory).
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, OutOfMemoryError)


class ApiError(Exception):
    """A request the service refuses, with the HTTP status, a message naming what was wrong and, for
    "come back later" answers (408, 503), the seconds to wait before retrying (``Retry-After``)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: Optional[float] = None):
        super().__init__(status, code, message, retry_after_s)  # args keep it picklable across deployments
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> Optional[dict]:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}


def not_an_image(message: str) -> ApiError:
    return ApiError(400, "not_an_image", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def unsupported_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def bad_parameter(message: str) -> ApiError:
    return ApiError(422, "invalid_parameter", message)


def request_timeout(message: str) -> ApiError:
    return ApiError(408, "request_timeout", message)


def overloaded(message: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(503, "overloaded", message, retry_after_s)


def unavailable(message: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(503, "unavailable", message, retry_after_s)
