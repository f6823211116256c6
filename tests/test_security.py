"""TLS, mutual TLS and API keys, with certificates made by the test itself."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import serving, wait_until

from embedserve.client import Client, UnauthenticatedError, UnavailableError
from embedserve.service.security.api_keys import KeyFileError, hash_line, parse_key_file
from embedserve.service.security.tls import TlsConfigError


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key), key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, server: bool
) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from another CA
    folder: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_key, ca_cert = make_ca("embedserve test CA")
    _, other_key, other_cert = make_ca("some other CA")
    return Pki(
        ca=ca,
        server=issue(ca_key, ca_cert, "embedserve", server=True),
        client=issue(ca_key, ca_cert, "indexer", server=False),
        stranger=issue(other_key, other_cert, "intruder", server=False),
        folder=tmp_path_factory.mktemp("pki"),
    )


def test_tls_server_serves_tls_clients_and_refuses_plaintext(
    pki: Pki, qwen3_embedding_folder: Path
) -> None:
    with serving(
        model=qwen3_embedding_folder,
        warmup=False,
        tls_cert=pki.write("server.pem", pki.server.cert),
        tls_key=pki.write("server.key", pki.server.key),
    ) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, root_certificates=pki.ca.cert, timeout=10) as client:
            assert client.embed(["secure"]).vectors.shape == (1, 64)
        with Client(target, timeout=3, retry=None) as plaintext, pytest.raises(UnavailableError):
            plaintext.embed(["x"])


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(
    pki: Pki, qwen3_embedding_folder: Path
) -> None:
    with serving(
        model=qwen3_embedding_folder,
        warmup=False,
        tls_cert=pki.write("server.pem", pki.server.cert),
        tls_key=pki.write("server.key", pki.server.key),
        tls_client_ca=pki.write("ca.pem", pki.ca.cert),
    ) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(
            target,
            root_certificates=pki.ca.cert,
            private_key=pki.client.key,
            certificate_chain=pki.client.cert,
        ) as client:
            assert client.embed(["mutual"]).vectors.shape == (1, 64)
        # The command line, with and without the client certificate.
        cli = [sys.executable, "-m", "embedserve.service", "embed", "--target", target]
        cli += ["--root-cert", str(pki.write("ca-cli.pem", pki.ca.cert)), "--retries", "1"]
        mutual = [
            "--client-cert",
            str(pki.write("client.pem", pki.client.cert)),
            "--client-key",
            str(pki.write("client.key", pki.client.key)),
        ]
        served = subprocess.run([*cli, *mutual, "mutual"], capture_output=True, text=True)
        assert served.returncode == 0, served.stderr
        assert len(json.loads(served.stdout)["embeddings"]) == 1
        no_cert = subprocess.run([*cli, "--timeout", "5", "x"], capture_output=True, text=True)
        assert no_cert.returncode != 0 and "UNAVAILABLE" in no_cert.stderr
        half = subprocess.run([*cli, *mutual[:2], "x"], capture_output=True, text=True)
        assert half.returncode != 0 and "go together" in half.stderr
        for key, cert in ((None, None), (pki.stranger.key, pki.stranger.cert)):
            with (
                Client(
                    target,
                    root_certificates=pki.ca.cert,
                    private_key=key,
                    certificate_chain=cert,
                    timeout=3,
                ) as refused,
                pytest.raises(UnavailableError),
            ):
                refused.embed(["let me in"])


def test_bad_tls_configuration_fails_at_start(pki: Pki, qwen3_embedding_folder: Path) -> None:
    with (
        pytest.raises(TlsConfigError, match="both --tls-cert and --tls-key"),
        serving(
            model=qwen3_embedding_folder, warmup=False, tls_cert=pki.write("c.pem", pki.server.cert)
        ),
    ):
        pass
    with (
        pytest.raises(TlsConfigError, match="cannot read"),
        serving(
            model=qwen3_embedding_folder,
            warmup=False,
            tls_cert=pki.folder / "missing.pem",
            tls_key=pki.folder / "missing.key",
        ),
    ):
        pass


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text("# service keys\n" + hash_line("first-secret-key", "indexer") + "\n")
    return path


def test_api_keys_guard_every_api_call(
    key_file: Path, qwen3_embedding_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(model=qwen3_embedding_folder, warmup=False, api_keys=key_file) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target) as anonymous, pytest.raises(UnauthenticatedError) as missing:
            anonymous.embed(["x"])
        assert "missing" in missing.value.message
        wrong = [("authorization", "Bearer wrong-key-value")]
        with Client(target, metadata=wrong) as intruder, pytest.raises(UnauthenticatedError):
            intruder.rerank("q", ["d"])
        right = [("authorization", "Bearer first-secret-key")]
        with Client(target, metadata=right) as member:
            assert member.embed(["welcome"]).vectors.shape == (1, 64)
            assert member.info().models
        # Health is exempt by default, so that probes need no key.
        health = health_pb2_grpc.HealthStub(server.stubs.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="embedserve.v1.EmbedService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "first-secret-key" not in logged and "wrong-key-value" not in logged


def test_key_file_reloads_without_a_restart(key_file: Path, qwen3_embedding_folder: Path) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False, api_keys=key_file) as server:
        target = f"127.0.0.1:{server.port}"
        new = [("authorization", "Bearer rotated-key")]
        old = [("authorization", "Bearer first-secret-key")]
        key_file.write_text(hash_line("rotated-key", "rotated") + "\n")

        def accepted(metadata: list[tuple[str, str]]) -> bool:
            with Client(target, metadata=metadata, retry=None) as client:
                try:
                    client.embed(["probe"])
                except UnauthenticatedError:
                    return False
                return True

        wait_until(lambda: accepted(new), timeout=15, what="the rotated key to be accepted")
        assert not accepted(old)


def test_reflection_needs_a_key_unless_exempted(
    key_file: Path, qwen3_embedding_folder: Path
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for exempt, allowed in (
        ("grpc.health.v1.Health", False),
        ("grpc.reflection.v1alpha.ServerReflection", True),
    ):
        with serving(
            model=qwen3_embedding_folder, warmup=False, api_keys=key_file, auth_exempt=exempt
        ) as server:
            stub = reflection_pb2_grpc.ServerReflectionStub(server.stubs.channel)
            if allowed:
                reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
                names = {s.name for s in reply.list_services_response.service}
                assert "embedserve.v1.EmbedService" in names
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_key_file_format() -> None:
    entries = parse_key_file(
        hash_line("a", "alpha") + "\n\n# comment\n" + hash_line("b") + "  # trailing\n", "keys"
    )
    assert [e.name for e in entries] == ["alpha", "key4"]
    for bad in ("plaintext-key", "sha256:zz", "sha256:abcd"):
        with pytest.raises(KeyFileError, match="keys:1"):
            parse_key_file(bad, "keys")


def test_hash_key_command_reads_the_key_from_stdin(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedserve.service", "hash-key", "--name", "ci"],
        input="a-secret\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == hash_line("a-secret", "ci")
    generated = subprocess.run(
        [sys.executable, "-m", "embedserve.service", "hash-key", "--generate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert len(generated) == 2 and generated[1] == hash_line(generated[0])


def test_envoy_terminates_tls_and_speaks_tls_to_the_replicas(
    pki: Pki, qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    """client --TLS--> Envoy --TLS--> replica (which accepts TLS only)."""
    from test_envoy import free_port

    from embedserve.envoy.process import EnvoyProcess, validate
    from embedserve.envoy.render import (
        CLUSTER,
        DownstreamTls,
        Endpoint,
        EnvoyParams,
        UpstreamTls,
        write,
    )

    cert = pki.write("server.pem", pki.server.cert)
    key = pki.write("server.key", pki.server.key)
    ca = pki.write("ca.pem", pki.ca.cert)
    with serving(model=qwen3_embedding_folder, warmup=False, tls_cert=cert, tls_key=key) as replica:
        params = EnvoyParams(
            replicas=(Endpoint("127.0.0.1", replica.port),),
            port=free_port(),
            admin_port=free_port(),
            downstream_tls=DownstreamTls(str(cert), str(key)),
            upstream_tls=UpstreamTls(str(ca), sni="localhost"),
        )
        config = write(params, tmp_path / "envoy-tls.yaml")
        ok, output = validate(config)
        assert ok, output
        with open(tmp_path / "envoy.log", "w") as log:
            envoy = EnvoyProcess(config, params.admin_port, stdout=log, stderr=log)
            try:
                envoy.wait_ready()
                envoy.wait_healthy(CLUSTER, 1)  # its gRPC health checks speak TLS too
                target = f"127.0.0.1:{params.port}"
                with Client(target, root_certificates=pki.ca.cert, timeout=20) as client:
                    assert client.embed(["through envoy, encrypted"]).vectors.shape == (1, 64)
                with Client(target, timeout=3) as plaintext, pytest.raises(UnavailableError):
                    plaintext.embed(["x"])
            finally:
                envoy.stop()
