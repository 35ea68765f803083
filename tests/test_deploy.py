"""The self-hosting kit is checked, not just written: Kubernetes manifests against the API schemas,
the compose file and nginx config parsed, the container's configuration valid."""

from __future__ import annotations

import json
import re
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
    assert {n for n, s in services.items() if "profiles" not in s} == {"gateway", "nginx", "redis", "postgres"}
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


GRAFANA = DEPLOY / "grafana"


def dashboard() -> dict:
    return json.loads((GRAFANA / "turnstile.json").read_text())


def exported_metrics() -> set[str]:
    """The metric names proxy/metrics.py declares."""
    source = (DEPLOY.parent / "proxy" / "metrics.py").read_text()
    return set(re.findall(r'"(turnstile_[a-z_]+)"', source))


def queried_metrics(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"turnstile_[a-z_]+", expr)}


def test_dashboard_is_importable_and_provisionable():
    board = dashboard()
    assert board["schemaVersion"] == 39 and board["uid"] == "turnstile" and board["id"] is None
    # Import dashboard: Grafana asks for the Prometheus behind ${DS_PROMETHEUS}
    assert board["__inputs"] == [{"name": "DS_PROMETHEUS", "label": "Prometheus",
                                  "description": "The Prometheus that scrapes the gateways",
                                  "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert datasource["current"]["value"] == "${DS_PROMETHEUS}"
    # the panels only name the variable: a provisioned copy (no import to fill ${DS_PROMETHEUS} in) works
    panels_text = json.dumps(board["panels"])
    assert "DS_PROMETHEUS" not in panels_text
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    # what the import does: every ${DS_PROMETHEUS} replaced, the JSON still valid
    imported = json.loads((GRAFANA / "turnstile.json").read_text().replace("${DS_PROMETHEUS}", "abc123"))
    assert imported["templating"]["list"][0]["current"]["value"] == "abc123"


def test_dashboard_panels():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert len({p["title"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["title"] and panel["fieldConfig"]["defaults"]["unit"], panel["id"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_queries_only_exported_metrics():
    exported = exported_metrics()
    assert {"turnstile_requests_total", "turnstile_request_duration_seconds", "turnstile_streams_in_flight"} <= exported
    used = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = queried_metrics(expr)
            assert names, expr
            assert names <= exported, (panel["title"], names - exported)
            used |= names
            # quantiles from the histograms' buckets, every worker and gateway summed by bucket
            if "_bucket" in expr:
                quantile = r"histogram_quantile\(0\.\d+, sum by \(le[,)].*rate\(turnstile_[a-z_]+_bucket\[5m\]\)"
                assert re.search(quantile, expr), expr
    assert used == exported  # and every exported metric has a panel


def test_compose_monitoring_profile():
    text = (DEPLOY / "compose.yaml").read_text()
    assert "docker compose -f deploy/compose.yaml --profile monitoring up -d" in text
    services = yaml.safe_load(text)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == ["monitoring"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana-oss:")
    # published on the loopback interface only, like nginx
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"
    # the dashboard provider reads the folder the dashboard is mounted in
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "turnstile.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert mounts[f"{folder}/turnstile.json"] == "./grafana/turnstile.json"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{folder}/turnstile.json"
    # the data source is the compose Prometheus, under the uid the docs and the dashboard expect
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(s["type"], s["uid"], s["url"]) for s in sources] == [
        ("prometheus", "prometheus", "http://prometheus:9090")]
    assert sources[0]["jsonData"]["timeInterval"] == "15s"


def test_prometheus_scrapes_every_gateway():
    text = (DEPLOY / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "15s"
    # one target per replica: the service name resolves to every replica's address
    assert job["dns_sd_configs"] == [{"names": ["gateway"], "type": "A", "port": 8787, "refresh_interval": "30s"}]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "8787" in compose["services"]["gateway"]["expose"]
    assert configuration.load(DEPLOY / "turnstile.compose.toml").server.port == 8787
    # how to scrape gateways whose /metrics asks for a bearer token
    assert "token_env" in text and "credentials_file" in text
