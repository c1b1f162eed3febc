"""A kustomization rendered as `kubectl apply -k` would apply it: its resources, namespace and images.

Only the fields `deploy/k8s` uses are understood; a kustomization with any other field is refused, naming it,
so what the tests validate never silently differs from what kustomize builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

FIELDS = {"apiVersion", "kind", "namespace", "resources", "images"}
"""The fields of a kustomization.yaml this renderer applies."""
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
"""Kinds that live in no namespace, so the namespace field leaves them alone."""
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
"""Kinds whose pod template's containers get the images field's names and tags."""


class UnsupportedKustomization(ValueError):
    """A kustomization.yaml uses a field this renderer does not apply."""


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents the kustomization in `directory` builds, in the order of its resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = sorted(set(kustomization) - FIELDS)
    if unknown:
        raise UnsupportedKustomization(f"{directory / 'kustomization.yaml'}: unsupported field(s) {unknown}")
    documents = [doc for entry in kustomization.get("resources", []) for doc in _resource(directory / entry)]
    for doc in documents:
        if "namespace" in kustomization and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        for image in kustomization.get("images", []):
            _set_image(doc, image)
    return documents


def _resource(path: Path) -> Iterator[dict[str, Any]]:
    """The documents of one resource entry: a file of YAML documents, or a directory with a kustomization."""
    if path.is_dir():
        yield from render(path)
        return
    yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def _set_image(doc: dict[str, Any], image: dict[str, str]) -> None:
    """Rename and retag the containers of `doc` whose image is `image["name"]`, as kustomize's images field."""
    if doc["kind"] not in POD_OWNERS:
        return
    pod = doc["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name, tag = _split(container["image"])
        if name == image["name"]:
            name = image.get("newName", name)
            tag = f"@{image['digest']}" if "digest" in image else f":{image['newTag']}" if "newTag" in image else tag
            container["image"] = name + tag


def _split(image: str) -> tuple[str, str]:
    """An image reference as its name and its tag or digest (with the separator), e.g. ("redis", ":7")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, f"@{digest}"
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")
