"""TLS and mutual TLS between ``curvscope.Client`` (and the CLI) and the server, with
certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from curvscope import Client, CurvscopeError
from curvscope.cli import main as cli_main
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer


def _certificate(name, key, issuer_name, issuer_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory, stem, key, certificate):
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's one."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    _write(directory, "ca", ca_key, _certificate("test CA", ca_key, ca_name, ca_key, ca=True))
    for stem, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, stem, key, _certificate(stem, key, ca_name, ca_key, server=server))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    _write(directory, "stranger", other_key, _certificate("stranger", other_key, other_name, other_key))
    return directory


def test_tls(tmp_path, pki):
    config = ServerConfig(store=tmp_path / "store", tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with InProcessServer(config) as server:
        with Client(server.target, tls_ca=pki / "ca.pem") as client:
            assert client.capabilities()["api_version"] == "curvscope.v1"
        with Client(server.target, connect_timeout=1) as plaintext, pytest.raises(CurvscopeError) as caught:
            plaintext.capabilities()
        assert caught.value.code == "UNAVAILABLE"
        with Client(server.target, tls_ca=pki / "stranger.pem", connect_timeout=1) as untrusting, pytest.raises(CurvscopeError) as caught:
            untrusting.capabilities()
        assert caught.value.code == "UNAVAILABLE"


def test_mutual_tls_in_the_client_and_the_cli(tmp_path, pki, digits_files, capsys):
    config = ServerConfig(store=tmp_path / "store", tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem")
    with InProcessServer(config) as server:
        with Client(server.target, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                    tls_key=pki / "client.key") as client:
            assert client.capabilities()["api_version"] == "curvscope.v1"
        for cert, key in ((None, None), (pki / "stranger.pem", pki / "stranger.key")):
            with Client(server.target, tls_ca=pki / "ca.pem", tls_cert=cert, tls_key=key, connect_timeout=1) as refused:
                with pytest.raises(CurvscopeError) as caught:
                    refused.capabilities()
            assert caught.value.code == "UNAVAILABLE"
        with pytest.raises(CurvscopeError, match="go together"):
            Client(server.target, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem")
        flags = ["analyze", str(digits_files[0]), "--data", str(digits_files[1]), "--server", server.target,
                 "--tls-ca", str(pki / "ca.pem")]
        assert cli_main(flags + ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]) == 0
        assert "2,410 parameters" in capsys.readouterr().out  # the report table
        assert cli_main(flags + ["--connect-timeout", "1"]) == 3  # no client certificate: the server could not be reached
        assert cli_main(flags + ["--tls-cert", str(pki / "client.pem")]) == 2


GATE_POLICY = """
[analyses.hessian_eigen]
top_k = 1

[[checks]]
name = "sharpness"
path = "results.hessian_eigen.largest[0]"
fail = { max = 1e9 }
"""


def test_gate_takes_the_same_tls_and_token_flags_as_analyze(tmp_path, pki, digits_files, capsys):
    """Mutual TLS and a bearer token together, through ``curvscope gate``."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    config = ServerConfig(store=tmp_path / "store", tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem", token_file=tokens)
    policy = tmp_path / "curvscope.toml"
    policy.write_text(GATE_POLICY)
    with InProcessServer(config) as server:
        gate = ["gate", "--policy", str(policy), str(digits_files[0]), "--data", str(digits_files[1]),
                "--server", server.target, "--tls-ca", str(pki / "ca.pem"), "--token-file", str(tokens),
                "--json", str(tmp_path / "gate.json")]
        mutual = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert cli_main(gate + mutual) == 0
        assert "PASS" in capsys.readouterr().out
        assert (tmp_path / "gate.json").is_file()
        assert cli_main(gate + ["--connect-timeout", "1"]) == 3  # no client certificate: the handshake fails
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert cli_main(gate + ["--tls-cert", str(pki / "stranger.pem"), "--tls-key", str(pki / "stranger.key"),
                                "--connect-timeout", "1"]) == 3
        capsys.readouterr()
        wrong = tmp_path / "wrong"
        wrong.write_text("guess\n")
        # The last --token-file counts: a wrong token is refused (an input error, exit 2).
        assert cli_main(gate + mutual + ["--token-file", str(wrong)]) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert cli_main(gate + ["--tls-cert", str(pki / "client.pem")]) == 2  # half a client certificate
