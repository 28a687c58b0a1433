"""The admin token: one check, made before a request's body is read (pure ASGI) and again as a route dependency.

FastAPI reads and parses a form before it resolves any dependency, so a dependency alone would let an
unauthenticated client make the server receive a 200 MB upload before refusing it. :class:`AdminGate` answers
401/403 from the headers alone, for every route that declares :func:`require_admin`.
"""

import secrets

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.routing import Match

from ..core.config import Settings
from .errors import error_key


def check_admin(settings: Settings, authorization: str | None) -> None:
    """``Authorization: Bearer <SEGMENT_ADMIN_TOKEN>``, compared in constant time; :class:`HTTPException` if not."""
    if settings.admin_token is None:
        if settings.allow_unauthenticated_admin:
            return
        raise HTTPException(403, detail="admin routes are disabled: set SEGMENT_ADMIN_TOKEN and send "
                                        "'Authorization: Bearer <token>' (or, for local development only, "
                                        "SEGMENT_ALLOW_UNAUTHENTICATED_ADMIN=true)")
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    expected = settings.admin_token.get_secret_value().encode()
    # An empty token never matches (the configured one cannot be empty either: see Settings).
    if scheme.lower() != "bearer" or not token or not secrets.compare_digest(token.encode(), expected):
        raise HTTPException(401, detail="missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})


def _declares(dependant: Dependant, call) -> bool:
    return any(d.call is call or _declares(d, call) for d in dependant.dependencies)


class AdminGate:
    """Refuses requests to admin routes (those of ``routes`` depending on ``marker``) without the token, before any
    body byte is read; the connection is closed, since the unread body cannot be skipped.

    ``routes``: the application's API routes in the order they were included (the order the router tries them)."""

    def __init__(self, app, routes, settings: Settings, marker):
        self.app, self.settings = app, settings
        self.routes = [(r, _declares(r.dependant, marker)) for r in routes if isinstance(r, APIRoute)]

    def _match(self, scope):
        """Whether the route the router will call (the first that fully matches) is an admin route, and its scope."""
        for route, admin in self.routes:
            match, child = route.matches(scope)
            if match == Match.FULL:
                return admin, child
        return False, None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            admin, child = self._match(scope)
            if admin:
                try:
                    check_admin(self.settings, dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
                except HTTPException as exc:
                    scope.update(child)  # the route template, for the metrics
                    response = JSONResponse({error_key(scope["path"]): exc.detail}, exc.status_code,
                                            headers={**(exc.headers or {}), "Connection": "close"})
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)
