"""The model catalogue (/v1/models) and the API's own description (/openapi.json)."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, current_app

from models import Model
from models.tensor import TensorSpec
from webapp import openapi
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("catalog", __name__)

PATTERNS = ("serving-template", "web-single", "synchronous", "asynchronous")
"""Serving patterns every model takes part in."""


@bp.get("/v1/models")
def index() -> Response:
    """Every servable model with its versions, signature and the patterns it supports."""
    reg = registry()
    pipelines, ensembles = reg.pipelines(), reg.ensembles()
    roles = {name: ["sync-async"] for p in pipelines for name in (p.light, p.heavy)}
    for e in ensembles:
        for name in e.members:
            roles.setdefault(name, []).append("horizontal-microservice")
    return json_response({
        "models": [_entry(m, roles.get(m.spec.name, [])) for m in reg.models()],
        "pipelines": [{"name": p.name, "description": p.description, "light": p.light, "heavy": p.heavy}
                      for p in pipelines],
        "ensembles": [{"name": e.name, "description": e.description, "members": list(e.members),
                       "aggregate": e.aggregate} for e in ensembles],
        "problems": sorted(reg.problems.values()),
    })


@bp.get("/v1/cache")
def cache_stats() -> Response:
    """The prediction cache: which models use it, for how long, and their hits and misses."""
    cached = {m.spec.name: m.spec.options.cache_ttl_s for m in registry().models() if m.spec.options.cache_ttl_s > 0}
    try:
        counts = current_app.extensions["cache"].stats()
    except redis.RedisError:
        return json_response({"error": "the prediction cache's Redis is unreachable; predictions go on uncached"},
                             503, {"Retry-After": "5"})
    return json_response({"enabled": current_app.config["PREDICTION_CACHE"], "models": {
        name: {"ttl_s": ttl, **counts.get(name, {"hits": 0, "misses": 0})} for name, ttl in cached.items()}})


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI 3 description of this API."""
    return json_response(openapi.document())


def _entry(model: Model, roles: list[str]) -> dict:
    spec = model.spec
    return {
        "name": spec.name,
        "description": spec.description,
        "versions": list(model.versions),
        "default_version": model.default_number,
        "inputs": [_tensor(t) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        "labels": list(spec.labels),
        "patterns": [*PATTERNS, *(["prep-pred"] if spec.takes_images else []),
                     *(["prediction-cache"] if spec.options.cache_ttl_s > 0 else []), "batch", *roles],
        "cache_ttl_s": spec.options.cache_ttl_s,
    }


def _tensor(t: TensorSpec) -> dict:
    entry = {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)}
    if t.description:
        entry["description"] = t.description
    if t.image is not None:
        entry["accepts_images"] = True
    return entry
