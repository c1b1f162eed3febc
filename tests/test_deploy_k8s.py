"""deploy/k8s and docker-compose.yml: the kustomization renders, every document passes the schema of its kind
(Kubernetes' own, bundled by kubernetes-validate; KEDA's ScaledObject from deploy/k8s/schema), and the processes,
probes and scalers are the platform's: every queue served by one pool, every pool scaled on its queues' Redis
lists, named as kombu names them, one beat, probes that answer. Compose is checked as a file: no Docker here."""

from __future__ import annotations

import copy
import json
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from conftest import REDIS_URL, ROOT

from deploy.kustomization import UnsupportedKustomization, render
from models import Registry, Settings
from tasks.app import QUEUES, create_celery
from tasks.config import TaskSettings
from tasks.ensembles import member_queues
from webapp import close_app, create_app

K8S = ROOT / "deploy" / "k8s"
KUBERNETES = ("1.29", "1.37")
"""The oldest and newest Kubernetes whose schemas every manifest must pass."""
SCALED_OBJECT = json.loads((K8S / "schema" / "scaledobject.json").read_text())
NAMESPACE, IMAGE = "ml-serving", "ml-serving-platform:0.1.0"
Doc = dict[str, Any]


def check(doc: Doc) -> str:
    """Validate one document against the schema of its kind; answer which schemas it passed."""
    if doc["apiVersion"] == "keda.sh/v1alpha1":
        jsonschema.validate(doc, SCALED_OBJECT, cls=jsonschema.Draft202012Validator)
        return "keda"
    for version in KUBERNETES:
        kubernetes_validate.validate(doc, version, strict=True)
    return "kubernetes"


@pytest.fixture(scope="module")
def documents() -> list[Doc]:
    """The documents `kubectl apply -k deploy/k8s` would apply."""
    return render(K8S)


def of_kind(documents: list[Doc], kind: str) -> dict[str, Doc]:
    """The documents of one kind, by name."""
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def containers(doc: Doc) -> list[Doc]:
    """The containers of a Deployment's or Job's pod template."""
    return doc["spec"]["template"]["spec"]["containers"]


def option(command: list[str], flag: str) -> str | None:
    """The value that follows `flag` in a command line, if it is there."""
    return command[command.index(flag) + 1] if flag in command else None


def scalers(documents: list[Doc]) -> list[Doc]:
    """The documents that set some Deployment's replicas: KEDA's ScaledObjects and HorizontalPodAutoscalers."""
    return [d for d in documents if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]


def pools(documents: list[Doc]) -> dict[str, list[str]]:
    """Each Celery worker Deployment's queues (its -Q)."""
    found = {}
    for name, doc in of_kind(documents, "Deployment").items():
        command = containers(doc)[0]["command"]
        if command[:4] == ["celery", "-A", "tasks.worker", "worker"]:
            found[name] = option(command, "-Q").split(",")
    return found


def test_every_document_passes_the_schema_of_its_kind(documents):
    checked = Counter(check(doc) for doc in documents)
    assert sum(checked.values()) == len(documents)
    assert checked["keda"] == len(pools(documents)) == 6
    assert checked["kubernetes"] >= 13


def _misspelt_probe(doc: Doc) -> None:
    containers(doc)[0]["livenesProbe"] = containers(doc)[0].pop("livenessProbe")


def _text_replicas(doc: Doc) -> None:
    doc["spec"]["replicas"] = "1"


def _numeric_argument(doc: Doc) -> None:
    containers(doc)[0]["command"][-1] = 2


def _numeric_list_length(doc: Doc) -> None:
    doc["spec"]["triggers"][0]["metadata"]["listLength"] = 20


def _misspelt_list_name(doc: Doc) -> None:
    metadata = doc["spec"]["triggers"][0]["metadata"]
    metadata["listname"] = metadata.pop("listName")


def _no_address(doc: Doc) -> None:
    del doc["spec"]["triggers"][0]["metadata"]["addressFromEnv"]


@pytest.mark.parametrize(("kind", "name", "breaks"), [
    ("Deployment", "web", _misspelt_probe), ("Deployment", "beat", _text_replicas),
    ("Deployment", "worker-batch", _numeric_argument), ("ScaledObject", "worker-predict", _numeric_list_length),
    ("ScaledObject", "worker-prep", _misspelt_list_name), ("ScaledObject", "worker-shadow", _no_address),
])
def test_a_broken_manifest_fails_its_schema(documents, kind, name, breaks):
    doc = copy.deepcopy(of_kind(documents, kind)[name])
    check(doc)
    breaks(doc)
    with pytest.raises(jsonschema.ValidationError):
        check(doc)


def test_rendering_applies_namespace_and_image_and_refuses_what_it_cannot(documents, tmp_path):
    assert {d["metadata"].get("namespace") for d in documents} == {NAMESPACE}
    pods = [d for d in documents if d["kind"] in ("Deployment", "Job")]
    assert {c["image"] for d in pods for c in containers(d)} == {IMAGE}
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: [{path: p.yaml}]\n")
    with pytest.raises(UnsupportedKustomization, match="patches"):
        render(tmp_path)


def test_references_resolve(documents):
    deployments = of_kind(documents, "Deployment")
    sources = {*of_kind(documents, "ConfigMap"), *of_kind(documents, "Secret")}
    for doc in [*deployments.values(), *of_kind(documents, "Job").values()]:
        for source in (s for c in containers(doc) for s in c.get("envFrom", [])):
            assert next(iter(source.values()))["name"] in sources
    for service in of_kind(documents, "Service").values():
        labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
        assert any(service["spec"]["selector"].items() <= pod.items() for pod in labels)
    for scaler in scalers(documents):
        assert scaler["spec"]["scaleTargetRef"]["name"] in deployments


def test_every_deployment_has_probes(documents):
    for name, doc in of_kind(documents, "Deployment").items():
        for container in containers(doc):
            assert {"livenessProbe", "readinessProbe"} <= container.keys(), name


@pytest.fixture
def exposed_client() -> Iterator[Any]:
    """A client of the app as deployed: bound beyond loopback, so every request but the probes needs a key."""
    app = create_app({"TESTING": True, "bind": "0.0.0.0:8000", "api_keys": "on"})
    yield app.test_client()
    close_app(app)


def test_the_web_probes_answer_without_a_key(documents, exposed_client):
    (web,) = containers(of_kind(documents, "Deployment")["web"])
    assert exposed_client.get("/v1/models").status_code == 401
    probes = [web["livenessProbe"]["httpGet"]["path"], web["readinessProbe"]["httpGet"]["path"]]
    assert probes == ["/v2/health/live", "/v2/health/ready"]
    assert [exposed_client.get(path).status_code for path in probes] == [200, 200]


def test_worker_probes_ping_their_own_node(documents):
    for name in pools(documents):
        (worker,) = containers(of_kind(documents, "Deployment")[name])
        node = option(worker["command"], "-n").replace("%h", "$HOSTNAME")
        for probe in (worker["livenessProbe"], worker["readinessProbe"]):
            shell = probe["exec"]["command"]
            assert shell[:2] == ["sh", "-c"]
            assert shlex.split(shell[2])[1:7] == ["celery", "-A", "tasks.worker", "inspect", "ping", "-d"], name
            assert shlex.split(shell[2])[7] == node


def test_the_pools_serve_every_queue_once(documents):
    served = [queue for queues in pools(documents).values() for queue in queues]
    expected = {*QUEUES, *member_queues(Registry(Settings.from_env({})).ensembles())}
    assert sorted(served) == sorted(expected)


def test_beat_is_one_replica_recreated_and_unscaled(documents):
    beat = of_kind(documents, "Deployment")["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert "beat" not in {s["spec"]["scaleTargetRef"]["name"] for s in scalers(documents)}


def redis_location(documents: list[Doc]) -> tuple[str, str]:
    """Where the platform's settings put Redis: host:port, and the database, of the Secret's REDIS_URL."""
    url = urlsplit(of_kind(documents, "Secret")["platform-secrets"]["stringData"]["REDIS_URL"])
    return f"{url.hostname}:{url.port or 6379}", (url.path.strip("/") or "0")


def test_every_pool_scales_on_the_lists_of_its_queues(documents):
    config = of_kind(documents, "ConfigMap")["platform-config"]["data"]
    address, database = redis_location(documents)
    scalers = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in of_kind(documents, "ScaledObject").values()}
    for name, queues in pools(documents).items():
        spec = scalers[name]
        assert "replicas" not in of_kind(documents, "Deployment")[name]["spec"]  # KEDA owns the count
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        lists = [t["metadata"] for t in spec["triggers"] if t["type"] == "redis"]
        assert sorted(m["listName"] for m in lists) == sorted(queues)
        assert {config[m["addressFromEnv"]] for m in lists} == {address}
        assert {m["databaseIndex"] for m in lists} == {database}


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """The test Redis, which here stands for the deployment's broker."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_the_list_names_are_the_keys_kombu_queues_messages_on(documents, broker):
    app = create_celery(TaskSettings(redis_url=REDIS_URL))
    try:
        for scaler in of_kind(documents, "ScaledObject").values():
            for trigger in scaler["spec"]["triggers"]:
                key = trigger["metadata"]["listName"]
                before = broker.llen(key)
                app.send_task("predict", args=["no-such-job"], queue=key)
                assert broker.llen(key) == before + 1, key
                broker.lpop(key)  # the message just sent: kombu pushes on the left and takes from the right
    finally:
        app.close()


def compose() -> dict[str, Doc]:
    """docker-compose.yml's services, with its YAML merge keys applied."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def role(command: list[str]) -> tuple[frozenset[str], str | None, str | None]:
    """What a Celery worker's command line makes of it: its queues, its node name and its pool type."""
    return frozenset(option(command, "-Q").split(",")), option(command, "-n"), option(command, "-P")


def test_kubernetes_runs_the_commands_compose_runs(documents):
    services, deployments = compose(), of_kind(documents, "Deployment")
    command = {name: containers(doc)[0]["command"] for name, doc in deployments.items()}
    assert command["web"] == shlex.split(services["web"]["command"])
    assert command["beat"] == shlex.split(services["beat"]["command"])
    assert containers(of_kind(documents, "Job")["migrate"])[0]["command"] == shlex.split(services["migrate"]["command"])
    from_compose = {role(shlex.split(s["command"])) for s in services.values() if " worker " in s.get("command", "")}
    assert {role(command[name]) for name in pools(documents)} == from_compose


def test_every_compose_service_has_a_healthcheck():
    services = compose()
    lasting = {name: s for name, s in services.items() if s.get("restart") != "no"}  # one-shot: migrate
    assert set(services) - set(lasting) == {"migrate"}
    for name, service in lasting.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for needed, condition in service.get("depends_on", {}).items():
            assert condition["condition"] != "service_healthy" or "healthcheck" in services[needed], name
        if "build" in service:
            assert {"redis", "mariadb"} <= {k for k, v in service["depends_on"].items()
                                            if v["condition"] == "service_healthy"}, name


def test_compose_workers_are_checked_by_pinging_their_own_node():
    for name, service in compose().items():
        command = shlex.split(service.get("command", ""))
        if command[:4] == ["celery", "-A", "tasks.worker", "worker"]:
            node = option(command, "-n").replace("%h", "$$HOSTNAME")  # $$: compose's escape of a literal $
            kind, line = service["healthcheck"]["test"]
            assert kind == "CMD-SHELL"
            assert shlex.split(line)[:6] == ["celery", "-A", "tasks.worker", "inspect", "ping", "-d"], name
            assert shlex.split(line)[6] == node, name


def test_k8s_files_are_all_in_the_kustomization():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert all(Path(K8S / entry).is_file() for entry in listed)
