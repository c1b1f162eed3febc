"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json and used by the fuzz tests."""

from __future__ import annotations

from functools import cache
from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
ITEM_ID = {"name": "item_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
PAGING = [
    {"name": "page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
    {"name": "per_page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
]
HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "description": "length of the JSON header when binary tensor data follows it",
    "schema": {"type": "integer", "minimum": 0},
}
BINARY = {"type": "string", "format": "binary"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    reasons = {400: "invalid request", 404: "unknown model, version, job, item or run",
               409: "the job has started, or the model has a run queued or running",
               410: "the job has expired", 413: "body or image too large",
               415: "unsupported content type or encoding",
               503: "not ready, or the job queue or the batch store is unavailable"}
    return {str(c): _json(ERROR, reasons[c]) for c in codes}


def _get(summary: str, schema: dict, *codes: int) -> dict:
    return {"get": {"summary": summary, "responses": {"200": _json(schema, "OK"), **_errors(*codes)}}}


def _post(summary: str, body: dict, schema: dict, binary: bool = False, status: str = "200") -> dict:
    content = {"application/json": {"schema": body}}
    ok = _json(schema, "OK" if status == "200" else "Accepted")
    operation: dict = {"summary": summary}
    if binary:  # the binary tensor data extension: a JSON header, then raw tensor bytes
        content["application/octet-stream"] = {"schema": BINARY}
        ok["content"]["application/octet-stream"] = {"schema": BINARY}
        operation["parameters"] = [HEADER_LENGTH]
    return {"post": {
        **operation,
        "requestBody": {"required": True, "content": content},
        "responses": {status: ok, **_errors(400, 404, 413, 415, 503)},
    }}


def _versioned(paths: dict, path: str, operation: dict, suffix: str = "") -> None:
    """Add `path` and its `/versions/{version}` twin, with their path parameters."""
    for template, params in ((path, [NAME]), (path + "/versions/{version}", [NAME, VERSION])):
        paths[template + suffix] = {
            verb: {**op, "parameters": params + op.get("parameters", [])} for verb, op in operation.items()
        }


@cache
def document() -> dict[str, Any]:
    """The whole document."""
    obj = {"type": "object"}
    paths: dict[str, Any] = {
        "/v1/models": _get("List models with versions, signatures and patterns", obj),
        "/v1/cache": _get("The prediction cache: models, TTLs, hits and misses", obj, 503),
        "/v2": _get("Server metadata", obj, 400),
        "/v2/health/live": _get("Liveness", obj),
        "/v2/health/ready": _get("Readiness", obj, 503),
    }
    _versioned(paths, "/v1/models/{name}", _get("Model version status", obj, 404, 503))
    _versioned(paths, "/v1/models/{name}", _get("Signature metadata", obj, 404), "/metadata")
    queued = _json(_schema("JobAccepted"), "the batch latency class (X-Latency-Class: batch), queued as a job")
    predict = _post("Predict (TF Serving REST)", _schema("TFPredict"), obj)
    predict["post"]["responses"]["202"] = queued
    _versioned(paths, "/v1/models/{name}", predict, ":predict")
    submit = _post("Queue a prediction (a job)", _schema("JobSubmit"), _schema("JobAccepted"), status="202")
    submit["post"]["requestBody"]["content"]["multipart/form-data"] = {"schema": {
        "type": "object", "description": "image files, one instance each, for a model with one image input",
        "properties": {"callback_url": {"type": "string", "format": "uri"}},
    }}
    _versioned(paths, "/v1/models/{name}", submit, ":submit")
    pipeline = _post("Sync-async: the light model's answer now, the heavy model's job", _schema("PipelineSubmit"),
                     _schema("PipelineAnswer"))
    pipeline["post"]["responses"]["202"] = _json(_schema("PipelineAnswer"), "the job only: the light model failed")
    paths["/v1/pipelines/{name}:predict"] = {"post": {**pipeline["post"], "parameters": [NAME]}}
    fan_out = _post("Horizontal microservice: members in parallel, their aggregate", _schema("TFBody"),
                    _schema("EnsembleAnswer"))
    fan_out["post"]["responses"]["202"] = _json(_schema("JobAccepted"), "past the overall timeout: a job to poll")
    paths["/v1/ensembles/{name}:predict"] = {"post": {**fan_out["post"], "parameters": [NAME]}}
    job = _get("A job's state and result", _schema("Job"), 404, 410)
    job["delete"] = {"summary": "Cancel a queued job",
                     "responses": {"200": _json(_schema("Job"), "OK"), **_errors(404, 409, 410)}}
    paths["/v1/jobs/{job_id}"] = {verb: {**op, "parameters": [JOB_ID]} for verb, op in job.items()}
    _batch(paths)
    _data(paths)
    _operations(paths)
    _versioned(paths, "/v2/models/{name}", _get("Model metadata", obj, 404))
    _versioned(paths, "/v2/models/{name}", _get("Model readiness", obj, 404, 503), "/ready")
    infer = _post("Infer (Open Inference Protocol V2)", _schema("V2Infer"), _schema("V2Response"), binary=True)
    infer["post"]["responses"]["202"] = queued
    _versioned(paths, "/v2/models/{name}", infer, "/infer")
    return {
        "openapi": "3.1.0",
        "info": {"title": "ML serving platform", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def _batch(paths: dict[str, Any]) -> None:
    """The batch pattern's paths: items and runs."""
    obj = {"type": "object"}
    register = _post("Register items for the model's next batch run", _schema("BatchItems"), obj, status="201")
    items = _get("Batch items, newest first", obj, 400, 503)
    items["get"]["parameters"] = [*PAGING, {"name": "status", "in": "query", "required": False,
                                            "schema": {"enum": ["queued", "running", "succeeded", "failed"]}}]
    paths["/v1/batch/items"] = {**register, **items}
    paths["/v1/batch/items/{item_id}"] = {"get": {**_get("A batch item", obj, 404, 503)["get"],
                                                  "parameters": [ITEM_ID]}}
    trigger = _post("Start a batch run of a model now", _schema("BatchRun"), _schema("RunAccepted"), status="202")
    trigger["post"]["responses"].update(_errors(409))
    history = _get("The batch run history, newest first", obj, 400, 503)
    history["get"]["parameters"] = PAGING
    paths["/v1/batch/runs"] = {**trigger, **history}
    paths["/v1/batch/runs/{run_id}"] = {"get": {**_get("A batch run's progress", obj, 404, 503)["get"],
                                                "parameters": [RUN_ID]}}


def _operations(paths: dict[str, Any]) -> None:
    """The operations paths: the prediction log, drift checks, experiments, metrics."""
    obj = {"type": "object"}
    log = _get("Logged predictions of a model, newest first (`format=jsonl`: JSON lines)", obj, 400, 404, 503)
    text = {"type": "string", "format": "date-time"}
    query = (("version", {"type": "integer", "minimum": 1}), ("since", text), ("until", text),
             ("request_id", {"type": "string"}), ("outlier", {"type": "boolean"}),
             ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}), ("cursor", {"type": "string"}),
             ("format", {"enum": ["json", "jsonl"]}))
    log["get"]["parameters"] = [NAME, *({"name": n, "in": "query", "required": False, "schema": schema}
                                        for n, schema in query)]
    paths["/v1/models/{name}/log"] = log
    for suffix, summary in (("drift", "The latest drift check of each version's inputs"),
                            ("experiments", "Traffic, latency and shadow agreement per arm")):
        paths[f"/v1/models/{{name}}/{suffix}"] = {"get": {**_get(summary, obj, 404, 503)["get"], "parameters": [NAME]}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics of the web process",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}}


def _data(paths: dict[str, Any]) -> None:
    """The data cache pattern's paths: stored inputs and their warm-up."""
    obj = {"type": "object"}
    stored = _post("Store a raw input (an image, or one instance) by id", _schema("DataInput"), obj, status="201")
    content = stored["post"]["requestBody"]["content"]
    content["image/png"] = content["application/octet-stream"] = {"schema": BINARY}
    content["multipart/form-data"] = {"schema": {"type": "object", "description": "one image file"}}
    paths["/v1/data"] = stored
    data_id = {"name": "data_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths["/v1/data/{data_id}"] = {"get": {**_get("A stored input's record", obj, 404, 503)["get"],
                                           "parameters": [data_id]}}
    paths["/v1/data:warm"] = _post("Preprocess stored inputs for a model now", _schema("DataWarm"), obj)


def _schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_B64 = {"type": "object", "properties": {"b64": {"type": "string"}}, "required": ["b64"],
        "additionalProperties": False}
_VALUE = {"anyOf": [
    {"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "array"}, _B64,
    {"type": "object", "description": "with several inputs: the value of each input by name"},
]}
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                              "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object",
                       "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array"},
    },
}
_TIME = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS: dict[str, Any] = {
    "JobAccepted": {
        "type": "object", "required": ["job_id", "status_url"],
        "properties": {"job_id": {"type": "string", "format": "uuid"}, "status_url": {"type": "string"}},
    },
    "Job": {
        "type": "object",
        "required": ["job_id", "status", "model", "version", "created_at", "started_at", "finished_at"],
        "properties": {
            "job_id": {"type": "string", "format": "uuid"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "model": {"type": "string"}, "version": {"type": "integer"},
            "created_at": _TIME, "started_at": _TIME, "finished_at": _TIME,
            "result": {"type": "object", "description": "the answer :predict gives for the same body"},
            "error": {"type": "string"},
        },
    },
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "TFPredict": {
        "type": "object",
        "properties": {
            "signature_name": {"enum": ["", "serving_default"]},
            "instances": {"type": "array", "minItems": 1, "items": _VALUE},
            "inputs": _VALUE,
        },
        "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
        "additionalProperties": False,
    },
    "V2Infer": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "items": _V2_TENSOR},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            }},
        },
        "additionalProperties": False,
    },
    "V2Response": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _V2_TENSOR},
        },
    },
}
SCHEMAS["BatchItems"] = {
    "type": "object", "required": ["model", "instances"], "additionalProperties": False,
    "properties": {"model": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
                   "instances": SCHEMAS["TFPredict"]["properties"]["instances"]},
}
SCHEMAS["TFBody"] = {**SCHEMAS["TFPredict"], "oneOf": list(SCHEMAS["TFPredict"]["oneOf"]),
                     "properties": dict(SCHEMAS["TFPredict"]["properties"])}
"""A TF Serving body with inline inputs only (the ensembles and pipelines take no stored inputs)."""
_DATA_IDS = {"type": "array", "minItems": 1, "items": {"type": "string"},
             "description": "ids of stored inputs (POST /v1/data), one instance each"}
SCHEMAS["TFPredict"]["properties"]["data_ids"] = _DATA_IDS
SCHEMAS["TFPredict"]["oneOf"].append({"required": ["data_ids"]})
SCHEMAS["DataInput"] = {"oneOf": [
    {"type": "object", "required": ["instance"], "properties": {"instance": _VALUE}, "additionalProperties": False},
    _B64,
]}
SCHEMAS["DataWarm"] = {
    "type": "object", "required": ["model", "data_ids"], "additionalProperties": False,
    "properties": {"model": {"type": "string"}, "version": {"type": "integer", "minimum": 1}, "data_ids": _DATA_IDS},
}
SCHEMAS["BatchRun"] = {"type": "object", "required": ["model"], "additionalProperties": False,
                       "properties": {"model": {"type": "string"}}}
SCHEMAS["RunAccepted"] = {"type": "object", "required": ["run_id", "status_url"],
                          "properties": {"run_id": {"type": "integer"}, "status_url": {"type": "string"}}}
SCHEMAS["JobSubmit"] = {
    **SCHEMAS["TFPredict"],
    "properties": {**SCHEMAS["TFPredict"]["properties"], "callback_url": {"type": "string", "format": "uri"}},
}
SCHEMAS["PipelineSubmit"] = {
    **SCHEMAS["TFBody"],
    "properties": {**SCHEMAS["TFBody"]["properties"], "callback_url": {"type": "string", "format": "uri"}},
}
SCHEMAS["PipelineAnswer"] = {
    "type": "object",
    "required": ["pipeline", "light", "heavy"],
    "properties": {
        "pipeline": {"type": "string"},
        "light": {"type": "object", "description": "model, version and result, or model and error"},
        "heavy": {"type": "object", "description": "model, version, job_id and status_url, or model and error"},
    },
}
SCHEMAS["EnsembleAnswer"] = {
    "type": "object",
    "required": ["ensemble", "aggregate", "predictions", "members", "failed", "timed_out"],
    "properties": {
        "ensemble": {"type": "string"},
        "aggregate": {"enum": ["best", "mean", "vote"]},
        "predictions": {"type": "array", "items": {"type": "object"}},
        "members": {"type": "object", "description": "each member's status and result or error"},
        "failed": {"type": "array", "items": {"type": "string"}},
        "timed_out": {"type": "array", "items": {"type": "string"}},
    },
}
