"""The self-hosting kit is checked, not just written: Kubernetes manifests against the API schemas,
the compose file and nginx config parsed, the container's configuration valid."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from proxy import config as configuration
from proxy import store
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


def kinds() -> dict[tuple[str, str], dict]:
    """Every manifest by (kind, name)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}


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
    # The store's URL is the turnstile-store Secret's, as the pod's environment has it.
    secret = kinds()[("Secret", "turnstile-store")]
    monkeypatch.setenv("TURNSTILE_STORE_URL", secret["stringData"]["TURNSTILE_STORE_URL"])
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())
    path = tmp_path / "turnstile.toml"
    path.write_text(configmap["data"]["turnstile.toml"])
    assert main(["check-config", str(path)]) == 0
    cfg = configuration.load(path)
    assert cfg.store.url == ""  # nothing in the ConfigMap to contradict the Secret
    assert cfg.ledger.journal.startswith("/var/lib/turnstile/")  # the pod's emptyDir
    assert store.is_postgres(store.settings(cfg).url)


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "nginx", "redis", "postgres"}
    assert services["gateway"]["deploy"]["replicas"] == 2
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile"
    mounted = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.startswith("./")}
    for path in mounted:
        assert (DEPLOY / path).exists(), path
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("./", "/"))}
    assert named <= set(compose["volumes"])
    assert services["nginx"]["ports"] == ["127.0.0.1:8080:80"]


def test_compose_gateways_share_postgres():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway, postgres = services["gateway"], services["postgres"]
    # the gateways start once PostgreSQL answers, with the password it was created with
    assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert gateway["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert gateway["environment"]["TURNSTILE_STORE_PASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    assert any(v.endswith(":/var/lib/postgresql/data") and v.split(":")[0] in compose["volumes"]
               for v in postgres["volumes"])
    # the gateways' config names that server, its user and database
    cfg = configuration.load(DEPLOY / "turnstile.compose.toml")
    env = postgres["environment"]
    assert cfg.store.url == f"postgresql://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"
    assert cfg.store.password_env in gateway["environment"]
    assert cfg.ledger.journal.startswith("/var/lib/turnstile/")  # on the gateways' own volume
    assert any(v.endswith(":/var/lib/turnstile") for v in gateway["volumes"])


def test_the_image_keys_db_does_not_override_the_store_url():
    # The image sets TURNSTILE_KEYS_DB; the compose config's [store] url still wins.
    cfg = configuration.load(DEPLOY / "turnstile.compose.toml")
    url = store.settings(cfg, {"TURNSTILE_KEYS_DB": "/var/lib/turnstile/keys.db"}).url
    assert url == "postgresql://turnstile@postgres:5432/turnstile"


@pytest.mark.parametrize("name", ["turnstile.compose.toml", "turnstile.container.toml", "turnstile.example.toml"])
def test_shipped_configs_are_valid(name, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TURNSTILE_STORE_URL", raising=False)
    monkeypatch.setenv("TURNSTILE_KEYS_DB", str(tmp_path / "keys.db"))  # the container's volume is not here
    assert main(["check-config", str(DEPLOY / name)]) == 0


def test_dockerfile_copies_what_exists():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source


def test_kubernetes_runs_the_image_the_docs_build():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    built = (DEPLOY / "Dockerfile").read_text().splitlines()[1]
    docs = (DEPLOY.parent / "docs" / "operating.md").read_text()
    assert f"-t {image}" in built and f"docker build -f deploy/Dockerfile -t {image} ." in docs


def test_gateway_pods_share_postgres_and_no_volume():
    manifests = kinds()
    deployment = manifests[("Deployment", "turnstile")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    assert not [k for k in manifests if k[0] == "PersistentVolumeClaim"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert "emptyDir" in data  # the journal only: it outlives a restart of the container
    names = {e["name"] for e in container.get("env", [])}
    assert "TURNSTILE_KEYS_DB" not in names and "TURNSTILE_STORE_URL" not in names
    # the store's URL and password come from a Secret (a managed database's, or postgres.yaml's)
    secrets = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    assert "turnstile-store" in secrets
    store_secret = manifests[("Secret", "turnstile-store")]["stringData"]
    url = store_secret["TURNSTILE_STORE_URL"]
    assert store.is_postgres(url) and "@turnstile-postgres:5432/" in url
    assert "TURNSTILE_STORE_PASSWORD" in store_secret


def test_postgres_statefulset():
    manifests = kinds()
    statefulset = manifests[("StatefulSet", "turnstile-postgres")]
    service = manifests[("Service", "turnstile-postgres")]
    assert statefulset["spec"]["replicas"] == 1
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 70 and security["fsGroup"] == 70
    container = pod["spec"]["containers"][0]
    assert container["image"] == "postgres:16-alpine"
    assert container["readinessProbe"]["exec"]["command"][:3] == ["pg_isready", "-U", "turnstile"]
    assert any(m["name"] == claim["metadata"]["name"] for m in container["volumeMounts"])
    env = {e["name"]: e for e in container["env"]}
    # the server's password is the one the gateways are given
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "turnstile-store", "key": "TURNSTILE_STORE_PASSWORD"}
    assert env["POSTGRES_USER"]["value"] == "turnstile" and env["POSTGRES_DB"]["value"] == "turnstile"


def test_gateway_autoscales_and_survives_a_drain():
    manifests = kinds()
    deployment = manifests[("Deployment", "turnstile")]
    hpa = manifests[("HorizontalPodAutoscaler", "turnstile")]
    pdb = manifests[("PodDisruptionBudget", "turnstile")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "turnstile")
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 10
    cpu = hpa["spec"]["metrics"][0]["resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["averageUtilization"] == 70
    assert "cpu" in deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    # the PDB selects the gateway pods only, not Redis's or PostgreSQL's
    for kind, name in (("Deployment", "turnstile-redis"), ("StatefulSet", "turnstile-postgres")):
        labels = manifests[(kind, name)]["spec"]["template"]["metadata"]["labels"]
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
