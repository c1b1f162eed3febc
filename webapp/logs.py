"""What the web app's log lines are about: each request's id, model, version and key id (`tasks.logs`).

The data plane sets its own (`Served`); these hooks do it for every route Flask dispatches. The lines are JSON
or text as LOG_FORMAT says.
"""

from __future__ import annotations

from flask import Flask, g, request

from tasks import logs
from webapp import wire


def install(app: Flask) -> None:
    """Format the process's log lines as LOG_FORMAT says, and tell each line what request it belongs to."""
    logs.configure()
    app.before_request_funcs.setdefault(None, []).insert(0, _enter)  # before the key's check, which may log
    app.before_request(_identified)
    app.teardown_request(_leave)


def _enter() -> None:
    """Fix the request's id (the client's, or one made now) for every later read of its X-Request-ID, so its
    views, its jobs and its log lines carry the same one."""
    view, rid = request.view_args or {}, wire.request_id(request.headers.get("X-Request-ID", ""))
    request.environ["HTTP_X_REQUEST_ID"] = rid
    logs.current.set(logs.Context(request_id=rid, model=view.get("name"), version=view.get("version")))


def _identified() -> None:
    context, identity = logs.current.get(), g.get("identity")
    if context is not None and identity is not None:
        context.key_id = identity.key_id


def _leave(_: BaseException | None) -> None:
    logs.current.set(None)
