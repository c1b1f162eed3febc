"""`make run`'s launcher: web, a real Celery worker, beat and Flower, stopped together by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from deploy import launch

ROOT = Path(__file__).resolve().parent.parent
IRIS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]
LAUNCH_REDIS_URL = os.environ.get("TEST_LAUNCH_REDIS_URL", "redis://127.0.0.1:6379/14")

pytestmark = pytest.mark.integration


@dataclass
class Platform:
    process: subprocess.Popen
    web: str
    flower: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port.split("/")[0]))) == 0


def _wait(platform: Platform, url: str, auth: tuple[str, str] | None = None, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if platform.process.poll() is not None:
            pytest.fail(f"launcher exited with {platform.process.returncode}:\n{platform.output()[-4000:]}")
        try:
            if requests.get(url, auth=auth, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer in {timeout_s} s:\n{platform.output()[-4000:]}")


def _launch(tmp_path: Path, redis_url: str | None, **settings: str) -> Iterator[Platform]:
    web, flower = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(BIND=f"127.0.0.1:{web}", FLOWER_PORT=str(flower), WEB_CONCURRENCY="1", VAR_DIR=str(tmp_path / "var"),
               FLOWER_USER="ops", FLOWER_PASSWORD="s3cret", **settings)
    if redis_url:
        env["REDIS_URL"] = redis_url
    log = tmp_path / "launch.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "deploy.launch"], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    platform = Platform(process, f"http://127.0.0.1:{web}", f"http://127.0.0.1:{flower}", log)
    try:
        yield platform
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform on the real Redis of the test machine."""
    yield from _launch(tmp_path, LAUNCH_REDIS_URL)


@pytest.fixture
def fragile_platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform on the real Redis, giving up at the first process that dies."""
    yield from _launch(tmp_path, LAUNCH_REDIS_URL, LAUNCH_RESTARTS="0")


@pytest.fixture
def embedded_platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform with no REDIS_URL: the launcher starts its own Redis."""
    yield from _launch(tmp_path, None)


def _queued_prediction(platform: Platform, request_id: str = "launch-test") -> dict:
    """Submit a job to the platform's web process, let its worker run it, answer the finished job."""
    submitted = requests.post(f"{platform.web}/v1/models/iris:submit", json={"instances": IRIS}, timeout=10,
                              headers={"X-Request-ID": request_id})
    assert submitted.status_code == 202, submitted.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = requests.get(platform.web + submitted.json()["status_url"], timeout=10).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    pytest.fail(f"job not finished in 60 s: {job}")


def _batch_run(platform: Platform) -> dict:
    """Register items in the platform's SQL store (SQLite here), run them on its batch worker, answer the run."""
    registered = requests.post(f"{platform.web}/v1/batch/items", json={"model": "iris", "instances": IRIS}, timeout=10)
    assert registered.status_code == 201, registered.text
    started = requests.post(f"{platform.web}/v1/batch/runs", json={"model": "iris"}, timeout=10)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = requests.get(platform.web + started.json()["status_url"], timeout=10).json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.1)
    pytest.fail(f"batch run not finished in 60 s: {run}")


def _flower_saw(platform: Platform, task_name: str) -> bool:
    """Whether Flower's task list shows a task of that name (its events arrive asynchronously)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = requests.get(f"{platform.flower}/api/tasks", auth=("ops", "s3cret"), timeout=10).json()
        if any(t.get("name") == task_name for t in tasks.values()):
            return True
        time.sleep(0.5)
    return False


def _stop(platform: Platform) -> int:
    platform.process.send_signal(signal.SIGINT)
    return platform.process.wait(60)


def test_make_run_serves_queues_and_shows_flower_then_stops_on_ctrl_c(platform: Platform):
    _wait(platform, f"{platform.web}/v2/health/ready")
    answer = requests.post(f"{platform.web}/v1/models/iris:predict", json={"instances": IRIS}, timeout=10).json()
    assert [p["label_name"] for p in answer["predictions"]] == ["setosa", "virginica"]

    _wait(platform, f"{platform.flower}/api/workers?refresh=1", auth=("ops", "s3cret"))
    assert requests.get(f"{platform.flower}/api/workers", timeout=5).status_code == 401
    assert not _port_open(platform.flower.replace("127.0.0.1", "127.0.0.2"))  # Flower is on 127.0.0.1 alone
    assert "s3cret" not in platform.output()  # a configured password is never printed
    expected = {"preprocess", "predict", "predict_batch", "deliver_callback", "reclaim_batches", "batch_run",
                "batch_chunk", "batch_reconcile", "batch_scheduled"}
    deadline, registered = time.monotonic() + 30, set()
    while not expected <= registered and time.monotonic() < deadline:
        workers = requests.get(f"{platform.flower}/api/workers?refresh=1", auth=("ops", "s3cret"), timeout=10).json()
        registered = {name for w in workers.values() for name in w.get("registered", [])}
        time.sleep(0.5)
    assert expected <= registered

    job = _queued_prediction(platform, "trace-launch-1")
    assert job["status"] == "succeeded", job
    assert job["result"] == answer
    log_lines = [line for line in platform.output().splitlines() if "request trace-launch-1" in line]
    assert any("queued" in line for line in log_lines) and any("finished" in line for line in log_lines), log_lines
    assert _flower_saw(platform, "predict_batch")

    unique = [[time.time_ns() % 10**9 / 10**9 * 16] + [0.0] * 63]  # never cached by an earlier run on this Redis
    caching = [requests.post(f"{platform.web}/v1/models/digits-heavy:predict", json={"instances": unique},
                             timeout=10).headers.get("X-Cache") for _ in range(2)]
    assert caching == ["MISS", "HIT"]
    stored = requests.post(f"{platform.web}/v1/data", json={"instance": unique[0]}, timeout=10)
    assert stored.status_code == 201, stored.text
    by_id = requests.post(f"{platform.web}/v1/models/digits-heavy:predict", timeout=10,
                          json={"data_ids": [stored.json()["data_id"]]})
    assert by_id.status_code == 200 and by_id.headers["X-Cache"] == "HIT"  # the same tensor as just before

    run = _batch_run(platform)
    assert (run["status"], run["succeeded"]) == ("succeeded", 2), run
    assert _flower_saw(platform, "batch_chunk")
    assert "db: upgrade done on sqlite:///" in platform.output()

    assert _stop(platform) == 0
    assert not _port_open(platform.web) and not _port_open(platform.flower)
    for role in ("web", "worker", "batch-worker", "beat", "flower"):
        assert f"starting {role}" in platform.output()


def test_make_run_without_redis_url_starts_its_own_redis_again_should_it_die(embedded_platform: Platform):
    _wait(embedded_platform, f"{embedded_platform.web}/v2/health/ready")
    found = re.search(r"started a local Redis at (redis://\S+)", embedded_platform.output())
    assert found, embedded_platform.output()
    redis_url = found.group(1)
    assert redis_url != LAUNCH_REDIS_URL
    assert _queued_prediction(embedded_platform)["status"] == "succeeded"

    first = _children(embedded_platform, "redis-server")
    os.kill(first, signal.SIGKILL)  # a crash: what it held is in its append-only file
    _started_again(embedded_platform, "redis-server", first)
    assert "redis exited" in embedded_platform.output() and _port_open(redis_url)
    assert _queued_prediction(embedded_platform, "after-redis-died")["status"] == "succeeded"

    assert _stop(embedded_platform) == 0
    assert not _port_open(redis_url)


def test_make_run_starts_a_process_that_dies_again(platform: Platform):
    _wait(platform, f"{platform.web}/v2/health/ready")
    master = _children(platform, "gunicorn")
    workers = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    os.kill(master, signal.SIGKILL)  # its workers see it gone and stop; the launcher starts another master
    _started_again(platform, "gunicorn", master)
    for worker in map(int, workers):
        _gone(worker)
    _wait(platform, f"{platform.web}/v2/health/ready")
    assert "web exited" in platform.output() and platform.process.poll() is None
    assert _queued_prediction(platform, "after-web-died")["status"] == "succeeded"
    assert _stop(platform) == 0


def test_make_run_stops_everything_when_a_process_dies_too_often(fragile_platform: Platform):
    _wait(fragile_platform, f"{fragile_platform.web}/v2/health/ready")
    os.kill(_children(fragile_platform, "gunicorn"), signal.SIGKILL)
    assert fragile_platform.process.wait(60) == 1
    assert "web exited" in fragile_platform.output() and "stopping" in fragile_platform.output()
    assert not _port_open(fragile_platform.flower)


def _started_again(platform: Platform, command: str, dead: int, timeout_s: float = 60) -> int:
    """Wait until the launcher's child running `command` is another process than `dead`; answer its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", command], capture_output=True, text=True).stdout.split()
        children = [int(pid) for pid in found if _parent(int(pid)) == platform.process.pid and int(pid) != dead]
        if children and not _alive(dead):
            return children[0]
        time.sleep(0.1)
    pytest.fail(f"{command} was not started again in {timeout_s} s:\n{platform.output()[-3000:]}")


def _gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {timeout_s} s"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (not gone, nor a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(platform: Platform, command: str) -> int:
    """The pid of the launcher's one child running `command`."""
    found = subprocess.run(["pgrep", "-f", command], capture_output=True, text=True).stdout.split()
    children = [int(pid) for pid in found if _parent(int(pid)) == platform.process.pid]
    assert len(children) == 1, (command, children)
    return children[0]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_flower_gets_a_password_made_for_the_run_only_shown_on_a_terminal(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(REDIS_URL=LAUNCH_REDIS_URL, FLOWER_PORT=str(_free_port()))
    flower_env, made = launch.flower_login(env)
    assert made and len(made) >= 24 and made != launch.flower_login(env)[1]
    assert launch.flower_login({"FLOWER_USER": "ops", "FLOWER_PASSWORD": "s3cret"}) == (
        {"FLOWER_BASIC_AUTH": "ops:s3cret"}, None)

    master, replica = os.openpty()
    with open(replica, "w") as terminal:
        launch.show_once(f"password {made}", terminal)
    assert made in os.read(master, 1024).decode()
    os.close(master)
    with (tmp_path / "launch.log").open("w") as log_file:
        launch.show_once(f"password {made}", log_file)
    printed = capsys.readouterr().out
    assert made not in (tmp_path / "launch.log").read_text() + printed and "set FLOWER_PASSWORD" in printed

    command = launch.commands(env, tmp_path)["flower"]
    assert not any(made in arg for arg in command)
    with (tmp_path / "flower.log").open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env={**env, **flower_env}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{env['FLOWER_PORT']}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{url}/api/tasks", ("admin", made)):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.2)
        assert requests.get(f"{url}/api/tasks", auth=("admin", "admin"), timeout=5).status_code == 401
        assert not _port_open(url.replace("127.0.0.1", "127.0.0.2"))  # bound to loopback, not every interface
        assert made not in (tmp_path / "flower.log").read_text()
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str, auth: tuple[str, str]) -> bool:
    try:
        return requests.get(url, auth=auth, timeout=5).status_code == 200
    except requests.RequestException:
        return False
