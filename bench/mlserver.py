"""MLServer as the benchmark runs it: its own virtual environment, a model repository of iris, its command line.

MLServer's dependencies conflict with ours, so it gets a virtual environment of its own under var/ (gitignored),
made on first use from PyPI with MLServer and onnxruntime pinned, and reused while the pins stay the same.
The repository holds `settings.json` (server-wide: loopback ports, `parallel_workers`, no access log) and
`iris/model-settings.json` naming the ONNX runtime of `bench/mlserver_runtime.py` and the committed iris file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench.targets import MLSERVER_VERSION

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "var" / "bench" / "mlserver-venv"
PINS = (f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={metadata.version('onnxruntime')}", "uvloop==0.21.0")
"""MLServer; the onnxruntime our own servers run, so the model costs the same in both; and the uvloop of
MLServer's day (its inference workers call `asyncio.get_event_loop()` before setting a loop, which uvloop
0.22 and later refuse)."""
MODEL = ROOT / "models" / "iris" / "1" / "model.onnx"


def ensure_venv() -> Path:
    """The `mlserver` executable of MLServer's environment, made (or remade for new pins) first if need be."""
    stamp, executable = VENV / "bench-pins.txt", VENV / "bin" / "mlserver"
    wanted = "\n".join(PINS) + "\n"
    if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
        return executable
    print(f"installing {', '.join(PINS)} into {VENV.relative_to(ROOT)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    install = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", *PINS]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(install)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    stamp.write_text(wanted)
    return executable


def repository(folder: Path, ports: dict[str, int], workers: int) -> Path:
    """Write MLServer's settings and iris's model settings under `folder`; answer the folder to serve."""
    served = folder / "mlserver"
    (served / "iris").mkdir(parents=True, exist_ok=True)
    settings = {"host": "127.0.0.1", "http_port": ports["http"], "grpc_port": ports["grpc"],
                "metrics_port": ports["metrics"], "parallel_workers": workers, "debug": False}
    model = {"name": "iris", "implementation": "bench.mlserver_runtime.OnnxRuntime",
             "parameters": {"uri": str(MODEL)}}
    (served / "settings.json").write_text(json.dumps(settings, indent=2))
    (served / "iris" / "model-settings.json").write_text(json.dumps(model, indent=2))
    return served


def command(folder: Path, ports: dict[str, int], workers: int) -> tuple[list[str], dict[str, str], Path]:
    """`mlserver start` on a repository written under `folder`; the environment it needs (our root on the path,
    for the runtime) and the folder to run it in."""
    served = repository(folder, ports, workers)
    return [str(ensure_venv()), "start", str(served)], {"PYTHONPATH": str(ROOT)}, served
