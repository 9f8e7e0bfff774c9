"""deploy/: the shipped nginx config in front of real replicas, and the container and Kubernetes files
agreeing with the server (port, health probes, grace period)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_server
from lstmgen_client import Client
from nginx import command, prepare, require_nginx, start_nginx

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMPT = "First Citizen:\n"
REQUEST = dict(max_new_tokens=20, seed=1, temperature=0.8)
SERVICE = "lstmgen.v1.Generator"


@pytest.fixture
def replicas(bundles, tmp_path):
    servers = [start_server(bundles["char"], tmp_path / f"replica{i}.log") for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def nginx(replicas, tmp_path):
    with start_nginx([s.target for s in replicas], tmp_path) as proc:
        yield proc


def served(replica) -> int:
    """Streams a replica finished with OK, from its own access log."""
    return len(re.findall(r"stream end request_id=\S+ status=OK", replica.log.read_text()))


def wait_for(check, timeout: float = 5.0) -> bool:
    """The replica logs a stream's end just after the client saw it: give the line a moment."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_nginx_accepts_the_shipped_config(tmp_path):
    binary = require_nginx()
    conf = prepare(["127.0.0.1:50051", "127.0.0.1:50052"], 8080, tmp_path)
    r = subprocess.run(command(binary, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr


def test_calls_through_nginx_match_a_replica_and_reach_both(replicas, nginx):
    with Client(replicas[0].target) as direct, Client(nginx.target) as lb:
        assert lb.model_info() == direct.model_info()
        want = direct.generate(PROMPT, **REQUEST)
        got = [lb.generate(PROMPT, **REQUEST) for _ in range(6)]
    assert {(g.text, g.finished) for g in got} == {(want.text, want.finished)}
    # 1 direct + 6 through nginx, which spreads them over both replicas
    assert wait_for(lambda: served(replicas[0]) + served(replicas[1]) == 7), nginx.access_log.read_text()
    assert served(replicas[0]) >= 2 and served(replicas[1]) >= 1, nginx.access_log.read_text()


def test_health_check_through_nginx(nginx):
    with grpc.insecure_channel(nginx.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_a_killed_replica_costs_no_call(replicas, nginx):
    with Client(nginx.target) as lb:
        want = lb.generate(PROMPT, **REQUEST)
        lb.generate(PROMPT, **REQUEST)  # round robin: nginx now keeps an idle connection to each replica
        dead, alive = replicas
        assert wait_for(lambda: served(dead) + served(alive) == 2)
        before = served(alive)
        dead.stop(signal.SIGKILL)
        got = [lb.generate(PROMPT, **REQUEST) for _ in range(6)]  # one of them tries the dead one first
    assert all(g.text == want.text for g in got)
    assert wait_for(lambda: served(alive) == before + 6)
    # within fail_timeout nginx tries the dead replica once, then moves on to the other
    assert nginx.access_log.read_text().count(f"upstream={dead.target}, {alive.target} ") == 1


def k8s_documents() -> list[dict]:
    if os.environ.get("CI"):
        import yaml  # the dev extra; in CI a missing one is a failure, not a skip
    else:
        yaml = pytest.importorskip("yaml")
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def entrypoint() -> list[str]:
    line = next(l for l in (DEPLOY / "Dockerfile").read_text().splitlines() if l.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def test_image_and_kubernetes_agree_with_the_server():
    docs = k8s_documents()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    services = [d for d in docs if d["kind"] == "Service"]
    cmd = entrypoint()
    assert cmd[:2] == ["lstmgen", "serve"] and cmd[cmd.index("--port") + 1] == "50051"
    assert "EXPOSE 50051" in (DEPLOY / "Dockerfile").read_text()

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["grpc"]  # Kubernetes' own gRPC probe: grpc.health.v1 on the serving port
        assert check["port"] == 50051 and check.get("service", "") in ("", SERVICE), probe
    args = container.get("args", [])
    grace = float(args[args.index("--grace") + 1]) if "--grace" in args else 10.0
    assert pod["terminationGracePeriodSeconds"] > grace  # else the kubelet kills streams still draining

    assert services and all(p["targetPort"] in ("grpc", 50051) for s in services for p in s["spec"]["ports"])
    assert {s["spec"].get("clusterIP") for s in services} >= {None, "None"}  # a ClusterIP and a headless one
