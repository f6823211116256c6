"""``embedserve cluster`` with TLS: client --TLS--> Envoy --TLS--> replicas, mutual on both hops,
with certificates made by the test (the helpers of tests/test_security.py)."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import serving
from test_envoy import CLUSTER_COMMAND, alive, cluster_running, free_port
from test_security import issue, make_ca

from embedserve.client import Client, UnavailableError
from embedserve.envoy.process import Admin
from embedserve.envoy.render import CLUSTER
from embedserve.service.cli import build_parser
from embedserve.service.cluster import (
    REPLICA_TLS_ENV,
    ClusterTls,
    TlsFlagsError,
    TlsHandshakeError,
    probe,
    replica_command,
    replica_env,
)
from embedserve.service.security.handshake import ClientEnd, ServerEnd, UnusableEnd, handshake


@dataclass(frozen=True)
class Files:
    """PEM files: one CA signs the listener's and replicas' certificate (localhost, 127.0.0.1),
    the clients' certificate and Envoy's client certificate; ``other_ca`` signs the stranger."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    envoy_cert: Path
    envoy_key: Path
    stranger_cert: Path
    stranger_key: Path
    other_ca: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("cluster-pki")
    ca, ca_key, ca_cert = make_ca("embedserve cluster test CA")
    other, other_key, other_cert = make_ca("some other CA")
    made = {
        "ca": ca.cert,
        "other_ca": other.cert,
    }
    for name, pair in (
        ("server", issue(ca_key, ca_cert, "embedserve", server=True)),
        ("client", issue(ca_key, ca_cert, "indexer", server=False)),
        ("envoy", issue(ca_key, ca_cert, "envoy", server=False)),
        ("stranger", issue(other_key, other_cert, "intruder", server=False)),
    ):
        made[f"{name}_cert"], made[f"{name}_key"] = pair.cert, pair.key
    paths = {}
    for name, data in made.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return Files(**paths)


def _parse(*flags: str) -> Any:
    return build_parser().parse_args(["cluster", *flags])


# --- Flags ----------------------------------------------------------------------------------


def test_incoherent_tls_flags_are_refused(pem: Files, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    server = ["--tls-cert", str(pem.server_cert), "--tls-key", str(pem.server_key)]
    envoy = ["--upstream-cert", str(pem.envoy_cert), "--upstream-key", str(pem.envoy_key)]
    for flags, message in (
        (["--tls-cert", str(pem.server_cert)], "--tls-cert and --tls-key go together"),
        (["--tls-key", str(pem.server_key)], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pem.ca)], "--tls-client-ca needs --tls-cert"),
        (["--upstream-ca", str(pem.ca)], "--upstream-ca needs --tls-cert"),
        ([*server, *envoy], "need --upstream-ca"),
        (
            [*server, "--upstream-ca", str(pem.ca), "--upstream-cert", str(pem.envoy_cert)],
            "--upstream-cert and --upstream-key go together",
        ),
        ([*server, "--tls-client-ca", str(tmp_path / "missing.pem")], "cannot read"),
        (["--tls-cert", str(not_pem), "--tls-key", str(pem.server_key)], "not PEM"),
    ):
        with pytest.raises(TlsFlagsError, match=message):
            ClusterTls.from_args(_parse(*flags))


def test_tls_flags_become_replica_flags_and_envoy_params(
    pem: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = ClusterTls.from_args(_parse())
    assert plain.replica_flags() == [] and plain.probe_credentials() is None
    assert plain.downstream_params() is None and plain.upstream_params() is None
    assert not any(plain.summary().values())

    listener_only = ClusterTls.from_args(
        _parse("--tls-cert", str(pem.server_cert), "--tls-key", str(pem.server_key))
    )
    # TLS at the listener only: the replicas stay plaintext behind it.
    assert listener_only.replica_flags() == []
    assert listener_only.upstream_params() is None
    assert listener_only.summary() == {
        "tls": True,
        "mutual_tls": False,
        "upstream_tls": False,
        "upstream_mutual_tls": False,
    }

    args = _parse(
        "--tls-cert",
        str(pem.server_cert),
        "--tls-key",
        str(pem.server_key),
        "--upstream-ca",
        str(pem.ca),
        "--upstream-cert",
        str(pem.envoy_cert),
        "--upstream-key",
        str(pem.envoy_key),
    )
    tls = ClusterTls.from_args(args)
    command = replica_command(args, 50061, 1, 50062, tls)
    flags = dict(zip(command[-6::2], command[-5::2], strict=True))
    assert flags == {
        "--tls-cert": str(pem.server_cert.resolve()),
        "--tls-key": str(pem.server_key.resolve()),
        "--tls-client-ca": str(pem.ca.resolve()),
    }
    upstream = tls.upstream_params()
    assert upstream is not None and upstream.cert == str(pem.envoy_cert.resolve())
    # The replicas' TLS is the cluster's to decide, never their inherited environment's.
    for name in REPLICA_TLS_ENV:
        monkeypatch.setenv(name, "/somewhere/else.pem")
    assert not set(REPLICA_TLS_ENV) & set(replica_env())


def test_cluster_command_exits_2_on_bad_tls_flags_before_starting_anything(
    pem: Files, tmp_path: Path
) -> None:
    marker = tmp_path / "never-started-model"
    result = subprocess.run(
        [
            *CLUSTER_COMMAND,
            "--replicas",
            "1",
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
            "--model",
            str(marker),
            "--tls-cert",
            str(pem.server_cert),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--tls-cert and --tls-key go together" in result.stderr
    assert result.stdout == ""  # neither "ready" nor "stopped": nothing was started
    assert "starting replicas" not in result.stderr


# --- The real cluster -----------------------------------------------------------------------


def _health(
    address: str, credentials: grpc.ChannelCredentials | None
) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return reply.status


@pytest.mark.slow
def test_cluster_with_mutual_tls_on_both_hops(
    pem: Files, qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    flags = [
        "--tls-cert",
        str(pem.server_cert),
        "--tls-key",
        str(pem.server_key),
        "--tls-client-ca",
        str(pem.ca),
        "--upstream-ca",
        str(pem.ca),
        "--upstream-cert",
        str(pem.envoy_cert),
        "--upstream-key",
        str(pem.envoy_key),
    ]
    with cluster_running(qwen3_embedding_folder, tmp_path, 2, *flags) as cluster:
        ready = cluster.event(timeout=240)
        assert ready["event"] == "ready", ready
        assert (ready["tls"], ready["mutual_tls"]) == (True, True)
        assert (ready["upstream_tls"], ready["upstream_mutual_tls"]) == (True, True)
        target = ready["listener"]

        # Client -> Envoy: only TLS clients with a certificate from the client CA get through.
        with Client(
            target,
            root_certificates=pem.read("ca"),
            private_key=pem.read("client_key"),
            certificate_chain=pem.read("client_cert"),
            timeout=20,
        ) as client:
            for _ in range(4):  # more calls than replicas: each one goes through TLS
                assert client.embed(["through the TLS cluster"]).vectors.shape == (1, 64)
        refused: list[dict[str, Any]] = [
            {},  # plaintext
            {"root_certificates": pem.read("ca")},  # TLS, no client certificate
            {
                "root_certificates": pem.read("ca"),
                "private_key": pem.read("stranger_key"),
                "certificate_chain": pem.read("stranger_cert"),
            },
        ]
        for options in refused:
            with (
                Client(target, timeout=3, retry=None, **options) as outsider,
                pytest.raises(UnavailableError),
            ):
                outsider.embed(["let me in"])

        # Envoy -> replicas: Envoy's TLS health checks found every replica healthy.
        admin = Admin(cluster.admin_port)
        assert len([h for h in admin.hosts(CLUSTER) if h.healthy]) == 2
        # The replicas themselves speak mutual TLS only: Envoy's certificate is accepted,
        # plaintext and a TLS client without a certificate are not.
        envoy = grpc.ssl_channel_credentials(
            pem.read("ca"), pem.read("envoy_key"), pem.read("envoy_cert")
        )
        for replica in ready["replicas"]:
            address = replica["address"]
            assert _health(address, envoy) == health_pb2.HealthCheckResponse.SERVING
            for credentials in (None, grpc.ssl_channel_credentials(pem.read("ca"))):
                with pytest.raises(grpc.RpcError) as raised:
                    _health(address, credentials)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        pids = [ready["envoy_pid"], *(r["pid"] for r in ready["replicas"])]
        cluster.process.send_signal(signal.SIGTERM)
        assert cluster.process.wait(60) == 0
        assert cluster.event(timeout=5) == {"event": "stopped", "code": 0}
        assert [pid for pid in pids if alive(pid)] == []


# --- Certificates that cannot work together are refused before anything starts ------------


def test_a_pairing_that_completes_a_handshake_passes(pem: Files) -> None:
    replica = ServerEnd(pem.server_cert, pem.server_key, client_ca=pem.ca)
    envoy = ClientEnd(pem.ca, "127.0.0.1", pem.envoy_cert, pem.envoy_key)
    assert handshake(replica, envoy) is None
    one_way = ServerEnd(pem.server_cert, pem.server_key)
    assert handshake(one_way, ClientEnd(pem.ca, "localhost")) is None


@pytest.mark.parametrize(
    ("server", "client", "refused_by", "reason"),
    [
        (
            lambda p: ServerEnd(p.server_cert, p.server_key),
            lambda p: ClientEnd(p.other_ca, "127.0.0.1"),
            "client",
            "unable to get local issuer certificate",
        ),
        (
            lambda p: ServerEnd(p.server_cert, p.server_key),
            lambda p: ClientEnd(p.ca, "10.1.2.3"),
            "client",
            "10.1.2.3",
        ),
        (
            lambda p: ServerEnd(p.server_cert, p.server_key, client_ca=p.ca),
            lambda p: ClientEnd(p.ca, "127.0.0.1", p.stranger_cert, p.stranger_key),
            "server",
            "unable to get local issuer certificate",
        ),
        (
            lambda p: ServerEnd(p.server_cert, p.server_key, client_ca=p.ca),
            lambda p: ClientEnd(p.ca, "127.0.0.1"),
            "server",
            "CERTIFICATE",
        ),
    ],
    ids=["server-from-another-ca", "wrong-address", "client-from-another-ca", "no-client-cert"],
)
def test_the_end_that_refuses_the_other_is_named(
    pem: Files, server: Any, client: Any, refused_by: str, reason: str
) -> None:
    failure = handshake(server(pem), client(pem))
    assert failure is not None and failure.refused_by == refused_by
    assert reason.lower() in failure.reason.lower(), failure.reason


def test_a_key_that_does_not_match_its_certificate_is_an_unusable_end(pem: Files) -> None:
    with pytest.raises(UnusableEnd) as server_side:
        handshake(ServerEnd(pem.server_cert, pem.envoy_key), ClientEnd(pem.ca, "127.0.0.1"))
    assert server_side.value.end == "server"
    with pytest.raises(UnusableEnd) as client_side:
        handshake(
            ServerEnd(pem.server_cert, pem.server_key, client_ca=pem.ca),
            ClientEnd(pem.ca, "127.0.0.1", pem.envoy_cert, pem.server_key),
        )
    assert client_side.value.end == "client"


def test_the_cluster_refuses_certificates_that_cannot_work_together_naming_the_flag(
    pem: Files,
) -> None:
    server = ["--tls-cert", str(pem.server_cert), "--tls-key", str(pem.server_key)]
    upstream = ["--upstream-ca", str(pem.ca)]

    def client_pair(cert: Path, key: Path) -> list[str]:
        return ["--upstream-cert", str(cert), "--upstream-key", str(key)]

    for flags, message in (
        (
            [*server, "--upstream-ca", str(pem.other_ca)],
            "Envoy would refuse the replicas' certificate (--tls-cert)",
        ),
        (
            [*server, *upstream, *client_pair(pem.stranger_cert, pem.stranger_key)],
            "the replicas would refuse Envoy's client certificate (--upstream-cert)",
        ),
        (
            [*server, *upstream, *client_pair(pem.envoy_cert, pem.stranger_key)],
            "--upstream-cert/--upstream-key cannot be used for TLS",
        ),
        (
            ["--tls-cert", str(pem.server_cert), "--tls-key", str(pem.envoy_key), *upstream],
            "--tls-cert/--tls-key cannot be used for TLS",
        ),
    ):
        with pytest.raises(TlsFlagsError) as refused:
            ClusterTls.from_args(_parse(*flags))
        assert message in str(refused.value)


def test_the_cluster_command_exits_at_once_on_a_client_certificate_the_replicas_refuse(
    pem: Files, qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    """Over the network, a refused client certificate looks like a replica that never becomes
    reachable (the command waited out --startup-timeout-s, 300 s by default). It is refused
    before any replica starts."""
    flags = [
        "--tls-cert",
        str(pem.server_cert),
        "--tls-key",
        str(pem.server_key),
        "--upstream-ca",
        str(pem.ca),
        "--upstream-cert",
        str(pem.stranger_cert),
        "--upstream-key",
        str(pem.stranger_key),
    ]
    with cluster_running(qwen3_embedding_folder, tmp_path, 1, *flags) as cluster:
        assert cluster.process.wait(60) == 2
    stderr = (tmp_path / "cluster.err").read_text()
    assert "cannot start" in stderr and "(--upstream-cert)" in stderr, stderr[-3000:]
    assert "starting replicas" not in stderr


def test_the_readiness_probe_tells_a_failed_handshake_from_a_replica_still_starting(
    pem: Files, qwen3_embedding_folder: Path
) -> None:
    """The probe's own check, behind the one before start (gRPC's BoringSSL is the judge that
    counts): a handshake that fails raises at once; a closed port is only a reason to wait."""
    wrong_ca = grpc.ssl_channel_credentials(pem.read("other_ca"))
    with serving(
        model=qwen3_embedding_folder,
        warmup=False,
        tls_cert=pem.server_cert,
        tls_key=pem.server_key,
    ) as server:
        with pytest.raises(TlsHandshakeError, match="CERTIFICATE_VERIFY_FAILED"):
            probe(server.port, timeout=10, credentials=wrong_ca)
        right_ca = grpc.ssl_channel_credentials(pem.read("ca"))
        assert probe(server.port, timeout=10, credentials=right_ca) is None
    assert probe(free_port(), credentials=wrong_ca) is not None
