"""The one error shape of the HTTP API: ``{"error": {"code": ..., "message": ...}}`` with a status."""
from __future__ import annotations



class ApiError(Exception):
    """A request the service refuses, with the HTTP status and a message naming what was wrong."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)  # args keep it picklable across deployments
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def not_an_image(message: str) -> ApiError:
    return ApiError(400, "not_an_image", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def unsupported_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def bad_parameter(message: str) -> ApiError:
    return ApiError(422, "invalid_parameter", message)


def overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", message)
