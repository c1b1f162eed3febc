"""Online experiments: the data plane's traffic routed by the models' `[routing]` tables, its arms counted and
mirrored to shadows, and `GET /v1/models/{m}/experiments`, what each arm served and how its shadows agreed."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app

from models.routing import Routing
from tasks.experiments import Experiments
from webapp.dataplane import DataPlane
from webapp.mirror import Mirror
from webapp.repository import registry
from webapp.responses import json_response
from webapp.traffic import Traffic

bp = Blueprint("experiments", __name__)


def install(app: Flask, plane: DataPlane, redis_url: str) -> None:
    """Route `plane`'s traffic as the specs declare, count and mirror it, and serve the experiments' report."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
    store = app.extensions["experiments"] = Experiments(client)
    plane.traffic = traffic = Traffic(plane.registry)
    mirror = app.extensions["mirror"] = Mirror(traffic, store, app.extensions["celery"])
    plane.observers.append(mirror)
    app.register_blueprint(bp)


def close(app: Flask) -> None:
    """Stop the mirror's thread and close the experiments' Redis connections."""
    app.extensions["mirror"].close()
    app.extensions["experiments"].client.close()


@bp.get("/v1/models/<model:name>/experiments")
def report(name: str) -> Response:
    """Per arm (version) of a model: its share of the split, live requests and latency, each shadow's agreement."""
    routing = registry().model(name).spec.routing
    arms = [version for version, _ in routing.split] if routing else []
    found = current_app.extensions["experiments"].report(name, arms)
    for version, share in routing.split if routing else ():
        found["arms"][str(version)]["share"] = share
    return json_response({"model": name, "routing": _described(routing), **found})


def _described(routing: Routing | None) -> dict[str, Any] | None:
    """A `[routing]` table as the report shows it."""
    if routing is None:
        return None
    return {
        "split": {str(version): share for version, share in routing.split},
        "sticky_header": routing.sticky_header,
        "rules": [{"header": r.header, "equals": r.equals, "to": str(r.to)} for r in routing.rules],
        "shadow": [str(target) for target in routing.shadow],
        "queue_batch": routing.queue_batch,
    }
