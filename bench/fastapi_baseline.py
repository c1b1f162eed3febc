"""The baseline: a minimal FastAPI + onnxruntime service for the iris model, one POST /predict.

Serve it the way the benchmark does, one onnxruntime session per worker, made after fork:

    gunicorn bench.fastapi_baseline:app -k uvicorn_worker.UvicornWorker -w 2
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

MODEL = Path(__file__).resolve().parent.parent / "models" / "iris" / "1" / "model.onnx"
sessions: dict = {}


class Rows(BaseModel):
    """A batch of iris rows, four floats each."""

    data: list[list[float]]


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Create this worker's session at start-up, after gunicorn has forked it."""
    import onnxruntime as ort  # imported in the worker only, never in gunicorn's master

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("ORT_INTRA_OP_THREADS", "1"))
    options.inter_op_num_threads = 1
    sessions["iris"] = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    yield
    sessions.clear()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(rows: Rows) -> dict:
    """Answer each row's class probabilities."""
    features = np.asarray(rows.data, dtype=np.float32)
    (probabilities,) = sessions["iris"].run(["probabilities"], {"features": features})
    return {"probabilities": probabilities.tolist()}
