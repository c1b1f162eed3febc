"""The iris model called in the benchmark's own process: what any server adds to, and the right answer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.sample import Sample, summarise
from bench.targets import ROW

MODEL = Path(__file__).resolve().parent.parent / "models" / "iris" / "1" / "model.onnx"


class InProcess:
    """The iris session called directly, one row per call, on one intra-op thread."""

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
        self.feeds = {"features": np.asarray([ROW], dtype=np.float32)}

    def probabilities(self) -> np.ndarray:
        """The class probabilities of the benchmark's row."""
        return self.session.run(["probabilities"], self.feeds)[0][0]

    def measure(self, duration_s: float) -> Sample:
        """Call the session back to back for `duration_s` seconds."""
        run, feeds, clock = self.session.run, self.feeds, time.perf_counter_ns
        times: list[int] = []
        start = clock()
        deadline = start + int(duration_s * 1e9)
        while (now := clock()) < deadline:
            run(None, feeds)
            times.append(clock() - now)
        return summarise(times, (clock() - start) / 1e9)
