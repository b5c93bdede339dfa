"""OpenAI-style error JSON for every non-2xx answer, and the handlers that produce it."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.errors import error_json
from protocol.jobs import UNSUPPORTED, JobState
from protocol.outage import REDIS_AWAY, is_redis_oom
from tokenq.logs import get_logger

log = get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}
OOM_RETRY_AFTER_S = 5
# A job that did not succeed: failed is the server's fault (a 500), unless its error is the request's
# (invalid_request_error: a 400); cancelled and expired are outcomes the client asked for (DELETE, a deadline).
_FINAL_STATUS = {JobState.cancelled: 409, JobState.expired: 504}


def final_status(state: JobState, error_type: str) -> int:
    """The HTTP status that answers a job that ended `state` without a result (the waiting routes' answer
    and a batch line's `status_code`)."""
    return 400 if error_type == "invalid_request_error" else _FINAL_STATUS.get(state, 500)


class ApiError(Exception):
    """Raised anywhere in a request; becomes `{"error": {...}}` with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_json(message, type_ or _TYPES.get(status, "invalid_request_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"
_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_MAX_SHOWN_INPUT = 80  # characters of the client's value quoted back in a message


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried ("list[int]", "function-after[...]", "str"): not a
    field of the client's JSON."""
    return isinstance(part, str) and ("[" in part or part in _SCALAR_TAGS)


_NAMED_FIELD = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")


def field_path(loc: tuple | list) -> str | None:
    """Pydantic's loc as a dotted path, without FastAPI's leading "body" and union member names
    ("messages.0.role")."""
    parts = [str(p) for p in loc if p not in ("body",) and not _is_union_tag(p)]
    return ".".join(parts) or None


def most_telling(errors: list[dict]) -> dict:
    """Of pydantic's errors, the one to report: a rule of ours (its message says what is wrong) before a
    type mismatch against some other member of a union."""
    return next((e for e in errors if e.get("type") in ("value_error", UNSUPPORTED)), errors[0])


def describe_validation_error(err: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic error; the message names the field, the limit and the input."""
    param = field_path(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"request body is not valid JSON: {detail}", None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if param is None:
        # A rule over several fields (a model validator) names its field at the head of its message.
        named = _NAMED_FIELD.match(msg)
        return msg, named.group(1) if named else None
    text = f"{param}: {msg}"
    if ("input" in err and err.get("type") not in ("missing",) and not isinstance(err["input"], dict | list)
            and "(got " not in msg):
        shown = repr(err["input"])
        text += f" (got {shown if len(shown) <= _MAX_SHOWN_INPUT else shown[:_MAX_SHOWN_INPUT - 3] + '...'})"
    return text, param


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "invalid request body")
    err = most_telling(errors)
    if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "missing":
        return error_response(400, "request body is missing: a JSON object, sent with Content-Type: "
                                   "application/json")
    if tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("model_attributes_type", "dict_type"):
        content_type = request.headers.get("content-type") or "none"
        if content_type.partition(";")[0].strip().lower() == "application/json":  # JSON, but not an object
            return error_response(400, f"request body: a JSON object (got {type(err.get('input')).__name__})")
        return error_response(400, "request body: a JSON object, sent with Content-Type: application/json "
                                   f"(got Content-Type: {content_type[:80]})")
    message, param = describe_validation_error(err)
    return error_response(400, message, param, code=UNSUPPORTED if err.get("type") == UNSUPPORTED else None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, message = exc.status_code, str(exc.detail)
    route = f"{request.method} {request.url.path}"
    if status == 404 and message == "Not Found":  # the router's own: no route has this path
        message = f"no such route: {route} (GET /docs lists tokenq's routes)"
    elif status == 400 and message == _FASTAPI_PARSE_ERROR:  # not a JSON syntax error: FastAPI says no more
        message = ("request body is not valid JSON: it is not UTF-8 text, or it nests deeper than the JSON parser "
                   "goes (about 1,000 levels)")
    elif status == 405 and message == "Method Not Allowed":
        allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), None)
        message = f"method not allowed: {route}" + (f" (allowed: {allowed})" if allowed else "")
    return error_response(status, message, type_=_TYPES.get(status, "invalid_request_error"), headers=exc.headers)


def exception_response(exc: Exception) -> JSONResponse:
    """The answer to an exception raised while handling a request (the handlers below, and gateway/fastpath.py
    which runs outside FastAPI's): ApiError as itself, Redis away 503, anything else 500."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, REDIS_AWAY):
        log.debug("redis unavailable", error=repr(exc))  # the outage itself is logged once (warmup.keep_warm)
        return error_response(503, "the job store (Redis) is unavailable; try again later",
                              code="redis_unavailable")
    if is_redis_oom(exc):
        log.warning("redis out of memory", error=repr(exc))
        return error_response(503, "the job store (Redis) is out of memory and refuses new work; try again "
                                   "later", type_="server_overloaded", code="redis_oom",
                              headers={"Retry-After": str(OOM_RETRY_AFTER_S)})
    log.exception("unhandled error", error=repr(exc))
    return error_response(500, "internal server error", type_="server_error")


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


class UnhandledErrors:
    """Answers an exception that escaped every handler with the 500 JSON, once. Starlette's outermost
    ServerErrorMiddleware would answer it too, but then re-raise it to the server, which logs the
    traceback a second time; and here, inside the metrics middleware, the 500 is counted once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:  # the client left while its body came (an upload): no one to answer, no fault
            log.info("client left before its request arrived whole", path=scope.get("path"))
        except Exception as exc:
            if started:  # half an answer is out: only the server can end the connection
                raise
            await exception_response(exc)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(ResponseError, _redis_down)  # a Redis out of memory, a cluster down: 503
