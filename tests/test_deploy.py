"""The self-hosting kit is checked, not just written: Kubernetes manifests against the API schemas,
the compose file and nginx config parsed, the container's configuration valid."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from proxy.cli import main

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES = "1.30.0"


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(f"{path.name}#{i}", doc) for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
    return out


@pytest.mark.parametrize("name, doc", documents(), ids=[n for n, _ in documents()])
def test_manifest_is_valid(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_deployment_is_locked_down():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_configmap_toml_is_a_valid_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TURNSTILE_KEYS_DB", str(tmp_path / "keys.db"))  # the pod's volume is not here
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())
    path = tmp_path / "turnstile.toml"
    path.write_text(configmap["data"]["turnstile.toml"])
    assert main(["check-config", str(path)]) == 0


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "nginx", "redis"}
    assert services["gateway"]["deploy"]["replicas"] == 2
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile"
    mounted = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.startswith("./")}
    for path in mounted:
        assert (DEPLOY / path).exists(), path
    assert services["nginx"]["ports"] == ["127.0.0.1:8080:80"]


@pytest.mark.parametrize("name", ["turnstile.compose.toml", "turnstile.container.toml", "turnstile.example.toml"])
def test_shipped_configs_are_valid(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TURNSTILE_KEYS_DB", str(tmp_path / "keys.db"))  # the container's volume is not here
    assert main(["check-config", str(DEPLOY / name)]) == 0


def test_dockerfile_copies_what_exists():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source


def test_kubernetes_runs_the_image_the_docs_build_and_shares_no_sqlite_file():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    built = (DEPLOY / "Dockerfile").read_text().splitlines()[1]
    docs = (DEPLOY.parent / "docs" / "operating.md").read_text()
    assert f"-t {image}" in built and f"docker build -f deploy/Dockerfile -t {image} ." in docs
    # one pod on a ReadWriteOnce volume: SQLite is not safe on a filesystem shared across nodes
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pvc = yaml.safe_load((K8S / "pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
