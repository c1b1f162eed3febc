"""A minimal MLServer runtime that runs an ONNX file with onnxruntime (MLServer ships no ONNX runtime).

It runs inside MLServer's own virtual environment (`bench/mlserver.py`), never in ours: model-settings.json
names it as `bench.mlserver_runtime.OnnxRuntime` and `parameters.uri` the ONNX file. One session per
inference worker, one intra-op thread (`ORT_INTRA_OP_THREADS`), as every other server in the benchmark.
"""

from __future__ import annotations

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """V2 tensors in, every graph output out, through one onnxruntime session."""

    async def load(self) -> bool:
        """Open the session of the file `parameters.uri` names."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("ORT_INTRA_OP_THREADS", "1"))
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Run the graph on the request's tensors, decoded by MLServer's numpy codec."""
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        named = zip(self.output_names, results, strict=True)
        outputs = [NumpyCodec.encode_output(name, array) for name, array in named]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
