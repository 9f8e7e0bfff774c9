"""TLS and bearer-token auth through the real server, with certificates made in the test."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmgen.tools.scrape import scrape_metrics
from lstmgen_client import Client, UnauthenticatedError, UnavailableError
from tests.conftest import start_server
from tests.test_metrics import metrics_url

TOKEN = "s3cret-Token_0123456789"


def make_ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca("lstmgen test CA")
    key, cert = make_server_cert(ca_key, ca)
    _, other_ca = make_ca("some other CA")
    files = {"ca": pem(ca), "cert": pem(cert), "key": pem(key), "other_ca": pem(other_ca),
             "token": TOKEN.encode() + b"\n"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


@pytest.fixture(scope="module")
def secure(bundles, pki, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "secure.log"
    s = start_server(bundles["char"], log, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                     "--auth-token-file", str(pki["token"]), "--metrics-port", "0")
    yield s
    s.stop()


def test_tls_with_right_ca_and_token(secure, pki):
    with Client(secure.target, timeout=10, root_certificates=pki["ca"].read_bytes(), token=TOKEN) as c:
        assert c.generate("First", max_new_tokens=10, seed=1).finished.generated_tokens == 10
        assert c.model_info().level == "char"


def test_tls_with_wrong_ca_or_plaintext_fails(secure, pki):
    with Client(secure.target, timeout=5, root_certificates=pki["other_ca"].read_bytes(), token=TOKEN) as c:
        with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            c.model_info()
    with Client(secure.target, timeout=5, token=TOKEN) as c:  # plaintext to a TLS port
        with pytest.raises(UnavailableError):
            c.model_info()


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
def test_missing_or_wrong_token_unauthenticated(secure, pki, token):
    with Client(secure.target, timeout=10, root_certificates=pki["ca"].read_bytes(), token=token) as c:
        with pytest.raises(UnauthenticatedError, match="authorization: Bearer"):
            c.generate("First", max_new_tokens=5)
        with pytest.raises(UnauthenticatedError):
            c.model_info()


def test_token_scheme_is_case_insensitive_and_health_stays_open(secure, pki):
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with grpc.secure_channel(secure.target, creds) as ch:
        info = ch.unary_unary("/lstmgen.v1.Generator/GetModelInfo")
        assert info(b"", timeout=5, metadata=(("authorization", f"bearer {TOKEN}"),))
        with pytest.raises(grpc.RpcError) as e:
            info(b"", timeout=5, metadata=(("authorization", TOKEN),))  # no scheme
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING  # no token needed


def test_rejections_counted(secure, pki):
    url = metrics_url(secure)
    before = scrape_metrics(url)['lstmgen_rejections_total{reason="unauthenticated"}']
    with Client(secure.target, timeout=10, root_certificates=pki["ca"].read_bytes()) as c:
        for _ in range(3):
            with pytest.raises(UnauthenticatedError):
                c.model_info()
    assert scrape_metrics(url)['lstmgen_rejections_total{reason="unauthenticated"}'] - before == 3


def generate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", "generate", *args], capture_output=True, text=True,
                          timeout=60)


def test_generate_cli_with_tls_ca_and_token(secure, pki):
    base = ["--server", secure.target, "--prompt", "First", "--max-new-tokens", "7", "--seed", "3", "--json",
            "--tls-ca", str(pki["ca"])]
    r = generate_cli(*base, "--auth-token-file", str(pki["token"]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generated_tokens"] == 7
    r = generate_cli(*base)
    assert r.returncode == 2 and "UNAUTHENTICATED" in r.stderr


def test_bad_security_flags_fail_at_start(bundles, pki, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundles["char"]), "--port", "0",
                               *args], capture_output=True, text=True, timeout=60)

    r = serve("--tls-cert", str(pki["cert"]))
    assert r.returncode == 2 and "--tls-key" in r.stderr
    r = serve("--auth-token-file", str(tmp_path / "missing-token"))
    assert r.returncode == 2 and "missing-token" in r.stderr
    (tmp_path / "empty").write_text("\n")
    r = serve("--auth-token-file", str(tmp_path / "empty"))
    assert r.returncode == 2 and "empty" in r.stderr and "token" in r.stderr


def _raw_calls(ch):
    """The two RPC shapes, with raw bytes: an empty GetModelInfo and a small Generate request."""
    from lstmgen_client.v1 import generator_pb2 as pb

    info = ch.unary_unary("/lstmgen.v1.Generator/GetModelInfo")
    gen = ch.unary_stream("/lstmgen.v1.Generator/Generate")
    body = pb.GenerateRequest(prompt="First", max_new_tokens=3).SerializeToString()
    return {"info": lambda md: info(b"", timeout=5, metadata=md),
            "generate": lambda md: list(gen(body, timeout=5, metadata=md))}


@pytest.mark.parametrize("method", ["info", "generate"])
def test_unauthenticated_reply_echoes_the_request_id(secure, pki, method):
    """Every call's id comes back in the trailing metadata (the proto says so), refused ones too."""
    with grpc.secure_channel(secure.target, grpc.ssl_channel_credentials(pki["ca"].read_bytes())) as ch:
        call = _raw_calls(ch)[method]
        for md, want in (((("x-request-id", "auth-probe-1"),), "auth-probe-1"), ((), None)):
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            trailing = dict(e.value.trailing_metadata() or ())
            assert "x-request-id" in trailing, trailing
            assert trailing["x-request-id"] == want if want else len(trailing["x-request-id"]) == 16
    assert "call refused request_id=auth-probe-1" in secure.log.read_text()


@pytest.mark.parametrize("method", ["info", "generate"])
def test_two_authorization_entries_are_refused(secure, pki, method):
    """Even with the right token first: which entry a proxy or server reads is not defined."""
    right, wrong = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")
    with grpc.secure_channel(secure.target, grpc.ssl_channel_credentials(pki["ca"].read_bytes())) as ch:
        call = _raw_calls(ch)[method]
        call((right,))  # one entry: accepted
        for md in ((right, wrong), (right, right), (wrong, right)):
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "2 'authorization' metadata entries" in e.value.details(), e.value.details()
    assert "Traceback" not in secure.log.read_text()
