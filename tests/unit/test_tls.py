"""HTTPS: the service's uvicorn config with ``tls_cert``/``tls_key`` (`service.server.
server_config`, what the SelectionActor serves with) on a real uvicorn server on loopback, with
a self-signed certificate made here, and the client that verifies it by default."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from saelect.client import SelectionClient, SelectionError
from saelect.service.app import create_app
from saelect.service.server import server_config
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import SPEC, TOKEN, ServerThread, free_socket


def self_signed(tmp: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP SAN) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "saelect-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp)
    settings = Settings(
        store=str(tmp / "store"),
        allowed_roots=["/usr/share/datasets"],
        api_token=TOKEN,
        tls_cert=str(cert),
        tls_key=str(key),
    )
    app = create_app(FakeBackend(500), settings)
    server = ServerThread(app, free_socket(), server_config(app, settings)).start()
    assert server.url.startswith("https://127.0.0.1:")
    yield server.url, cert
    server.stop()


def test_client_with_the_ca_bundle_talks_https(tls_server: tuple[str, Path]) -> None:
    url, cert = tls_server
    with SelectionClient(url, token=TOKEN, verify=str(cert), retries=0) as c:
        assert c.healthz()["status"] == "ok"
        job = c.create_job(SPEC)["id"]
        idx = c.indices(job, 0, 1, 2)
        assert idx.size == 63 and idx.tolist() == c.indices(job, 0, 1, 2).tolist()


def test_client_verifies_by_default_and_fails_at_once(tls_server: tuple[str, Path]) -> None:
    """A self-signed certificate is not trusted without the bundle: tls_error, no retries."""
    url, _ = tls_server
    with SelectionClient(url, token=TOKEN, retries=5, backoff=10.0) as c:
        sleeps: list[float] = []
        c._sleep = sleeps.append
        with pytest.raises(SelectionError) as err:
            c.healthz()
    assert (err.value.status, err.value.code) == (0, "tls_error"), err.value
    assert "certificate" in err.value.message.lower() and sleeps == []


def test_plain_http_is_not_served_on_the_tls_port(tls_server: tuple[str, Path]) -> None:
    url, _ = tls_server
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)


def test_settings_tls_pair_scheme_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Settings(tls_cert=str(tmp_path / "c.pem"))
    s = Settings(tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem"))
    assert s.public_url(8443) == "https://127.0.0.1:8443"
    assert Settings().public_url(8000) == "http://127.0.0.1:8000"
    with pytest.raises(FileNotFoundError, match="certificate"):
        server_config(None, s)
    assert server_config(None, Settings()).ssl_certfile is None
    with pytest.raises(ValueError, match="CA bundle"):
        SelectionClient("https://127.0.0.1:1", verify=str(tmp_path / "missing.pem"))


def test_serve_cli_passes_the_tls_options() -> None:
    from saelect.service.cli import build_parser

    args = build_parser().parse_args(["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert (args.tls_cert, args.tls_key) == ("c.pem", "k.pem")


def test_saelect_jobs_trusts_the_ca_bundle_from_the_environment(
    tls_server: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`saelect jobs list` against the HTTPS service: fails without SAELECT_CA_BUNDLE, lists the
    jobs with it."""
    from saelect.service.cli import main

    url, cert = tls_server
    monkeypatch.setenv("SAELECT_API_TOKEN", TOKEN)
    monkeypatch.delenv("SAELECT_CA_BUNDLE", raising=False)
    assert main(["jobs", "list", "--url", url]) != 0
    assert "tls_error" in capsys.readouterr().err
    with SelectionClient(url, token=TOKEN, verify=str(cert)) as c:
        job = c.create_job(SPEC)["id"]
    monkeypatch.setenv("SAELECT_CA_BUNDLE", str(cert))
    assert main(["jobs", "list", "--url", url]) == 0
    assert job in [j["id"] for j in json.loads(capsys.readouterr().out)]
