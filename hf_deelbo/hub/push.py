"""Talking to the Hub: a timeout for every request, fast failure when it is out of reach, and one
clear `HubPushError` for a push that failed."""

from __future__ import annotations

import contextlib
import logging
import os
import time

logger = logging.getLogger(__name__)

# Seconds a call to the Hub (a push, a repo creation: every request and retry it makes) may take
# before it fails instead of hanging: HF_DEELBO_HUB_TIMEOUT, default 300. Connecting is limited to
# 10 s per request.
DEFAULT_HUB_TIMEOUT = 300.0

# When the current call must end (time.monotonic()), set by `hub_call`; None outside one.
_deadline: float | None = None


def hub_timeout() -> float:
    return float(os.environ.get("HF_DEELBO_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT))


@contextlib.contextmanager
def hub_call(seconds: float | None = None):
    """Bound everything inside to `seconds` (default HF_DEELBO_HUB_TIMEOUT), huggingface_hub's
    retries included: each request waits at most the time left, and once none is left the next
    request or retry fails with `HubCallTimedOut` (which huggingface_hub does not retry; at most one
    of its back-off pauses, up to 8 s, may pass before it)."""
    global _deadline
    set_hub_timeout(seconds)
    outer = _deadline
    _deadline = time.monotonic() + (hub_timeout() if seconds is None else seconds)
    if outer is not None:
        _deadline = min(_deadline, outer)
    try:
        yield
    finally:
        _deadline = outer


def hub_http_library():
    """The HTTP library huggingface_hub talks through (httpx2 from huggingface_hub 2, httpx before),
    for its timeout and error types: whichever it is, it is huggingface_hub's dependency, not ours."""
    from huggingface_hub.utils import _http

    return getattr(_http, "httpx2", None) or _http.httpx


def set_hub_timeout(seconds: float | None = None) -> None:
    """Give huggingface_hub's HTTP client a timeout (its default waits forever), through its public
    `set_client_factory`. A client factory the user installed is left alone. Which factory is
    installed is read from huggingface_hub's private `_GLOBAL_CLIENT_FACTORY` (no public reader
    exists, 1.33–2.5); where a release drops it, the package leaves the client as it is, with a
    warning, and requests wait as huggingface_hub's own defaults say."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    httpx = hub_http_library()
    if seconds is None:
        seconds = hub_timeout()
    if not hasattr(_http, "_GLOBAL_CLIENT_FACTORY") or not hasattr(_http, "default_client_factory"):
        logger.warning(
            "This huggingface_hub does not expose its HTTP client factory: HF_DEELBO_HUB_TIMEOUT is not "
            "applied, and Hub requests wait as huggingface_hub's defaults say."
        )
        return
    current = _http._GLOBAL_CLIENT_FACTORY
    if current is not _http.default_client_factory and not getattr(current, "hf_deelbo_timeout", None):
        return
    if getattr(current, "hf_deelbo_timeout", None) == seconds:
        return

    def client_factory():
        client = _http.default_client_factory()
        client.timeout = httpx.Timeout(seconds, connect=min(10.0, seconds))
        client.event_hooks["request"].append(_within_deadline)
        client.event_hooks["response"].append(_within_deadline)
        return client

    client_factory.hf_deelbo_timeout = seconds
    set_client_factory(client_factory)


def _within_deadline(message) -> None:
    """httpx event hook: a request may wait only the time the current `hub_call` has left."""
    if _deadline is None:
        return
    left = _deadline - time.monotonic()
    if left <= 0:
        raise HubCallTimedOut(
            f"the Hub did not answer within the timeout (HF_DEELBO_HUB_TIMEOUT={hub_timeout():g} s "
            "for the whole call, retries included)"
        )
    if hasattr(message, "extensions") and not hasattr(message, "status_code"):  # a request
        message.extensions["timeout"] = {
            key: min(value, left) if value is not None else left
            for key, value in message.extensions.get("timeout", {}).items()
        }


class HubCallTimedOut(Exception):
    """The whole call to the Hub ran out of HF_DEELBO_HUB_TIMEOUT. Not an httpx error, so that
    huggingface_hub does not retry it."""


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output directory is untouched. `reason`: the cause
    and what to do, in a few words; `status_code`: the HTTP status, if the Hub answered."""

    def __init__(self, message: str, reason: str = "", status_code: int | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.status_code = status_code


def check_repo_namespace(repo_id: str, token: str | bool | None = None) -> str:
    """`namespace/name` for `repo_id`: as given, or with the logged-in user's namespace.

    Raises:
        HubPushError: `repo_id` has no namespace and no Hub login tells whose it is.
    """
    if "/" in repo_id:
        return repo_id
    from huggingface_hub import HfApi

    try:
        namespace = HfApi().whoami(token=token)["name"]
    except Exception as error:  # noqa: BLE001 - no token, an invalid one, or an unreachable Hub
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubPushError(
            f"repo id {repo_id!r} has no namespace and the Hub cannot tell whose it is ({reason}). "
            f"Pass 'your-namespace/{repo_id}', or log in with `hf auth login`."
        ) from None
    return f"{namespace}/{repo_id}"


def push_error(error: Exception, output_dir: str, repo_id: str | None, wrote_output: bool = True) -> HubPushError:
    """One clear error for a failed push: the cause (the HTTP status where the Hub answered: 401/403
    name the token), what to do, and, once something was written (`wrote_output`), that nothing
    local was lost."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HubPushError):
        return error
    httpx = hub_http_library()
    cause, seen = error, {id(error)}
    while not isinstance(cause, (HfHubHTTPError, httpx.TimeoutException, HubCallTimedOut)):
        following = cause.__cause__ or cause.__context__
        if following is None or id(following) in seen:
            break
        cause = following
        seen.add(id(cause))
    if not isinstance(cause, (HfHubHTTPError, httpx.TimeoutException, HubCallTimedOut)):
        cause = error  # the innermost explicit cause
        while cause.__cause__ is not None:
            cause = cause.__cause__
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    target = repo_id or "namespace/name"
    if status in (401, 403):
        action = (
            f"the Hub refused the token ({status}): log in with `hf auth login` (or set HF_TOKEN / pass --token) "
            f"with a token that may write to {target}"
        )
    elif isinstance(cause, HubCallTimedOut):
        action = f"{cause}; push again later"
    elif isinstance(cause, httpx.TimeoutException):
        action = (
            f"the Hub did not answer within the timeout ({type(cause).__name__}; HF_DEELBO_HUB_TIMEOUT sets it); "
            "push again later"
        )
    elif status is not None:
        action = f"the Hub answered {status} ({text}); push again later"
    else:
        action = f"the Hub is unreachable ({type(cause).__name__}: {text}); push again once it is reachable"
    if wrote_output:
        then = (
            f"The local output in {output_dir} is intact; {action} (trainer.push_to_hub(), or "
            f"hf-deelbo push {output_dir} --repo_id {target})."
        )
    else:
        then = f"Nothing was trained or written yet; {action}, then start again."
    return HubPushError(
        f"Could not push to {constants.ENDPOINT}/{repo_id or ''}: {then}", reason=action, status_code=status
    )


class HubUnreachableError(OSError):
    """The Hub does not answer: raised before any download, in one line saying how to work offline."""


def check_hub_reachable(what: str, local_alternative: str, timeout: float = 5.0) -> None:
    """Fail fast when `what` (e.g. "--dataset_name 'beans'") needs the Hub and the Hub does not
    answer: huggingface_hub and datasets retry a refused or timed-out connection for 20-60 s and
    then raise a long traceback. One HEAD request to `HF_ENDPOINT` (any HTTP status means it
    answers). Nothing is checked in offline mode (`HF_HUB_OFFLINE=1`), where the libraries read
    their caches only.

    Raises:
        HubUnreachableError: naming `what`, the endpoint, the cause, `HF_HUB_OFFLINE=1` and
            `local_alternative` (what to pass instead, e.g. "--train_dir DIR").
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any transport error means the Hub is out of reach
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubUnreachableError(
            f"{what} is on the Hub, which cannot be reached ({constants.ENDPOINT}: {reason}). To work offline, set "
            f"HF_HUB_OFFLINE=1 (what is already in the cache is used) or pass {local_alternative}."
        ) from None
