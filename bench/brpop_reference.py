"""The book's asynchronous design, the reference our job pipeline is held to: SET + LPUSH, workers on BRPOP.

The client stores a job's input (one float32 row of 64 pixels) under the job's key and pushes the job's id
on one list, in one round trip. Each worker process pops ids with BRPOP, reads the input, runs the
digits-light artefact with its own onnxruntime session (one intra-op thread) and SETs the result (the
label as int64, then the ten probabilities as float32) under the job's result key; the client polls for
that key. Nothing of the platform runs here: it is what a bare queue over Redis lists costs.

Start a worker with `python -m bench.brpop_reference REDIS_URL`; it runs until it is terminated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import redis

MODEL = Path(__file__).resolve().parent.parent / "models" / "digits-light" / "1" / "model.onnx"
QUEUE = "brpop:queue"
READY = "brpop:ready"
LABEL_BYTES = 8


def input_key(job_id: str) -> str:
    """Where a job's input row waits."""
    return f"brpop:{job_id}:input"


def result_key(job_id: str) -> str:
    """Where a job's result appears."""
    return f"brpop:{job_id}:result"


def submit(client: redis.Redis, job_id: str, row: np.ndarray) -> None:
    """Store a job's row and queue its id, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.set(input_key(job_id), np.ascontiguousarray(row, dtype="<f4").tobytes())
    pipe.lpush(QUEUE, job_id)
    pipe.execute()


def encode(label: np.ndarray, probabilities: np.ndarray) -> bytes:
    """One row's result as stored: the label, then the probabilities."""
    return label.astype("<i8").tobytes() + probabilities.astype("<f4").tobytes()


def decode(result: bytes) -> tuple[int, np.ndarray]:
    """The label and probabilities of a stored result."""
    return int(np.frombuffer(result[:LABEL_BYTES], "<i8")[0]), np.frombuffer(result[LABEL_BYTES:], "<f4")


def session() -> object:
    """An onnxruntime session over the digits-light artefact, on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def serve(url: str) -> None:
    """Pop job ids forever: read each job's row, run the model, store the result."""
    model, client = session(), redis.Redis.from_url(url)
    client.incr(READY)
    while True:
        popped = client.brpop([QUEUE], timeout=1)
        if popped is None:
            continue
        job_id = popped[1].decode()
        row = np.frombuffer(client.get(input_key(job_id)), "<f4").reshape(1, -1)
        label, probabilities = model.run(["label", "probabilities"], {"pixels": row})
        client.set(result_key(job_id), encode(label[0], probabilities[0]))


if __name__ == "__main__":
    serve(sys.argv[1])
