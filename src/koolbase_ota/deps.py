"""What routes share: the app's context, the dashboard-token dependencies and a page's headers."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from koolbase_ota import audit
from koolbase_ota.config import Settings
from koolbase_ota.db import Database
from koolbase_ota.errors import InvalidInput, NotFound, Unauthorized
from koolbase_ota.projects import service as projects
from koolbase_ota.ratelimit import RateLimited, RateLimits
from koolbase_ota.sdk.cache import CheckCache
from koolbase_ota.storage import BundleStore

logger = logging.getLogger(__name__)


@dataclass
class AppContext:
    """Everything a request may need, built once by `create_app`."""

    settings: Settings
    db: Database
    store: BundleStore
    check_cache: CheckCache
    limits: RateLimits

    async def show_change(self) -> None:
        """After a committed change: this process's checks see it at once.

        Should the database fail just then, the change is saved all the same and reaches the
        checks with the next poll of the change log. The request succeeded, so it answers as
        such: a 503 would have the client repeat it (a second promoted copy, a toggle undone).
        """
        try:
            await self.check_cache.refresh(via=self.db)
        except Exception as exc:
            logger.warning(
                "the change is saved; this process's checks see it with the next poll (%s)",
                type(exc).__name__,
            )


async def get_context(request: Request) -> AppContext:
    # `async`, though it awaits nothing: FastAPI runs a plain `def` dependency in a worker
    # thread, a hop that cost every route about as much as the rest of its work together.
    context: AppContext = request.app.state.context
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]

_bearer = HTTPBearer(auto_error=False, description="A dashboard token: `kbota_...`")


@dataclass(frozen=True)
class Dashboard:
    """A dashboard request's project and the token that made it; `actor` for the audit trail."""

    project_id: uuid.UUID
    token_id: uuid.UUID

    @property
    def actor(self) -> str:
        return audit.token_actor(self.token_id)


async def authorised_dashboard(
    project_id: str,
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Dashboard:
    """The path's project and the bearer token, once the token is shown to belong to it.

    A token of another project gets the same 404 as a project that does not exist, so a token
    never learns which other projects exist. An address with too many failed attempts gets 429
    until its window passes, even with a valid token: whoever guesses cannot tell a right guess.
    """
    limits = context.limits
    address = limits.client_address(request.scope)
    retry_after = limits.auth_begin(address)
    if retry_after is not None:
        raise RateLimited(retry_after, "too many failed authentication attempts; retry later")
    failed = False
    try:
        if credentials is None:
            raise Unauthorized("missing dashboard token", code="missing_token")
        owner = await run_in_threadpool(
            projects.token_owner, context.db, token=credentials.credentials
        )
    except Unauthorized:
        failed = True
        raise
    finally:
        limits.auth_end(address, failed=failed)
    try:
        wanted = uuid.UUID(project_id)
    except ValueError:
        wanted = None
    if wanted != owner.project_id:
        raise NotFound("project not found", code="project_not_found")
    return Dashboard(project_id=owner.project_id, token_id=owner.token_id)


async def authorised_project(
    dashboard: Annotated[Dashboard, Depends(authorised_dashboard)],
) -> uuid.UUID:
    """The path's project, once the bearer token is shown to belong to it."""
    return dashboard.project_id


DashboardDep = Annotated[Dashboard, Depends(authorised_dashboard)]
ProjectDep = Annotated[uuid.UUID, Depends(authorised_project)]


def json_object(
    body: bytes, *, expected: str, fields: Collection[str] | None, optional: bool = False
) -> dict[str, Any]:
    """A dashboard route's JSON object body holding only `fields` (None: the service checks
    them), with our own error codes, not FastAPI's 422. `optional`: an empty body is `{}`."""
    if optional and not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: arrays or objects nested past the interpreter's limit (`[[[...`),
        # which fit easily in the body limit; otherwise a 500.
        raise InvalidInput(f"the body must be JSON: {expected}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"the body must be {expected}", code="invalid_body")
    unknown = set() if fields is None else set(data) - set(fields)
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))}", code="invalid_body")
    return data


def parse_id(raw: str, *, what: str) -> uuid.UUID:
    """A path id; one that is not a UUID cannot exist, so it is a 404 like any unknown id."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"{what} not found", code=f"{what}_not_found") from None


# Pages (`koolbase_ota.paging`)


def page_headers(what: str) -> dict[str, Any]:
    """The OpenAPI description of a page's headers; `what` names what follows."""
    return {
        "X-Next-Cursor": {
            "description": f"Sent on a paginated answer when {what} follow: the `cursor` of "
            "the next page. The last page has none.",
            "schema": {"type": "string"},
        },
        "Link": {
            "description": 'With `X-Next-Cursor`: `<URL of the next page>; rel="next"`.',
            "schema": {"type": "string"},
        },
    }


def link_next_page(
    request: Request, response: Response, *, public_url: str, limit: int, cursor: str | None
) -> None:
    """Point the answer at its next page, when there is one."""
    if cursor is None:
        return
    query = urlencode({"limit": limit, "cursor": cursor})
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{public_url}{request.url.path}?{query}>; rel="next"'
