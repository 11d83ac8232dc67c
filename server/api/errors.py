"""OpenAI's error object for every error the API returns, and the handlers that produce it.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Statuses: 400 invalid request (bad JSON, wrong types, values out of range, too long for the
context), 401 missing or wrong API key, 404 unknown model or route, 405 wrong method, 413 body
too large, 429 queue full (with Retry-After), 503 draining / engine down. Validation errors are
400, as OpenAI returns them, not FastAPI's 422.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("quantserve.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


_DESCRIPTIONS = {400: "Invalid request", 401: "Missing or invalid API key",
                 404: "Unknown model", 413: "Request body too large",
                 429: "Queue full: retry after the Retry-After header's seconds",
                 503: "Shutting down, or the engine is not running"}
ERROR_RESPONSES: dict = {status: {"model": ErrorResponse, "description": text}
                         for status, text in _DESCRIPTIONS.items()}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype == "application/json" or ctype.endswith("+json")


_UNION_TAG = re.compile(r"^(function-\w+|constrained-\w+|str|int|float|bool|list|dict|none|"
                        r"\w+\[.*\])$")


def _param(error: dict) -> str | None:
    """The parameter an error is about, without pydantic's union-branch tags ("list[int]")."""
    loc = [str(x) for x in error.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
    return ".".join(loc) or None


def _most_relevant(errors: list[dict]) -> dict:
    """For a union, the branch whose type matched the input (a constraint failed, not the type)."""
    first = errors[0]
    root = _param(first) or ""
    for e in errors:
        kind = e.get("type", "")
        if (_param(e) or "").startswith(root) and not kind.endswith("_type") \
                and kind not in ("missing", "none_required"):
            return e
    return first


def _validation_message(exc: RequestValidationError, request: Request) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    first = _most_relevant(errors)
    param = _param(first)
    if param is None and not _is_json(request):
        return "the request body must be a JSON object sent with Content-Type: application/json", None
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc, request)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} not allowed on {request.url.path}")
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's wording when json.loads fails on bytes that are not UTF-8
            return error_response(400, "the request body is not valid UTF-8 JSON")
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
