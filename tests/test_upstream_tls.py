"""Upstream TLS (README "Configuration", `tls:`): a private CA, client certificates
(mTLS), `verify: false`, and the validation of the files, at `check`, at build
and at reload under a real supervisor.

Every certificate is made in the test (trustme); the provider is the recording
fake upstream with a server SSL context.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import build_config
from fluxgate.validation import validate
from tests.conftest import CLIENT_KEY
from tests.supervisor_process import Supervisor

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
SCRIPT = Path(sys.executable).parent / "fluxgate-supervisor"


@dataclass
class Pki:
    """The CAs and files of the tests: `ca` signs the provider, `client_ca` the proxy."""

    ca: trustme.CA
    client_ca: trustme.CA
    files: dict[str, str]  # name -> absolute path

    def server_context(self, require_client_certificate: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        if require_client_certificate:
            context.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    alice, bob = client_ca.issue_cert("alice"), client_ca.issue_cert("bob")
    files: dict[str, str] = {}

    def write(name: str, blob: Any) -> None:
        files[name] = str(directory / name)
        blob.write_to_path(files[name])

    write("ca.pem", ca.cert_pem)
    write("other-ca.pem", other_ca.cert_pem)
    write("alice.pem", alice.cert_chain_pems[0])
    write("alice.key", alice.private_key_pem)
    write("alice-with-key.pem", alice.private_key_and_cert_chain_pem)
    write("bob.pem", bob.cert_chain_pems[0])
    write("bob.key", bob.private_key_pem)
    files["garbage.pem"] = str(directory / "garbage.pem")
    Path(files["garbage.pem"]).write_text("not a certificate\n")
    files["missing.pem"] = str(directory / "missing.pem")
    files["directory"] = str(directory)
    return Pki(ca, client_ca, files)


@pytest.fixture
def mtls_upstream(pki: Pki) -> Iterator[FakeUpstreamThread]:
    """A provider signed by the private CA that requires a client certificate."""
    with FakeUpstreamThread(ssl=pki.server_context(require_client_certificate=True)) as up:
        yield up


def config(upstreams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": 1,
        "upstreams": {"request_timeout_ms": 5000, **upstreams},
        "api_keys": {"static": [{"id": "ci", "key": CLIENT_KEY}]},
    }


def upstream(path: str, url: str, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"request_path": path, "target_url": url}
    if tls is not None:
        spec["tls"] = tls
    return spec


def error_type(body: bytes) -> str:
    kind: str = json.loads(body)["error"]["type"]
    return kind


# -- through the proxy ------------------------------------------------------------


def test_private_ca_and_client_certificate_reach_a_provider_that_requires_them(
    pki: Pki, mtls_upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    f = pki.files
    mtls = {"ca_file": f["ca.pem"], "cert_file": f["alice.pem"], "key_file": f["alice.key"]}
    combined = {"ca_file": f["ca.pem"], "cert_file": f["alice-with-key.pem"]}
    sup = make_supervisor(
        config(
            {
                "mtls": upstream("/mtls", mtls_upstream.url, mtls),
                "combined": upstream("/combined", mtls_upstream.url, combined),
                "nocert": upstream("/nocert", mtls_upstream.url, {"ca_file": f["ca.pem"]}),
            }
        )
    )
    for prefix in ("/mtls", "/combined"):
        status, _, body = sup.request("GET", f"{prefix}/v1/models", AUTH)
        assert status == 200, body
        assert json.loads(body)["object"] == "list"
    assert [r.path for r in mtls_upstream.wait_for_requests(2)] == ["/v1/models"] * 2
    # The provider refuses a proxy without a client certificate: nothing gets through.
    status, _, _ = sup.request("GET", "/nocert/v1/models", AUTH)
    assert status == 502
    assert len(mtls_upstream.requests) == 2


def test_a_provider_the_configured_ca_did_not_sign_is_a_502_upstream_tls_error(
    pki: Pki, make_supervisor: Callable[..., Supervisor]
) -> None:
    with FakeUpstreamThread(ssl=pki.server_context()) as provider:
        wrong = {"ca_file": pki.files["other-ca.pem"]}
        sup = make_supervisor(config({"private": upstream("/private", provider.url, wrong)}))
        status, _, body = sup.request("GET", "/private/v1/models", AUTH)
        assert status == 502
        assert error_type(body) == "upstream_tls_error"
        assert provider.requests == []


def test_verify_false_reaches_a_provider_no_trusted_ca_signed(
    pki: Pki, make_supervisor: Callable[..., Supervisor]
) -> None:
    with FakeUpstreamThread(ssl=pki.server_context()) as provider:
        sup = make_supervisor(
            config(
                {
                    "unverified": upstream("/unverified", provider.url, {"verify": False}),
                    "default": upstream("/default", provider.url),
                }
            )
        )
        status, _, body = sup.request("GET", "/unverified/v1/models", AUTH)
        assert status == 200, body
        # The default verifies against the system's CAs, which never signed it.
        status, _, body = sup.request("GET", "/default/v1/models", AUTH)
        assert status == 502 and error_type(body) == "upstream_tls_error"
        assert len(provider.requests) == 1


def test_upstreams_with_different_client_certificates_never_share_a_connection(
    pki: Pki, mtls_upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    f = pki.files
    sup = make_supervisor(
        config(
            {
                name: upstream(
                    f"/{name}",
                    mtls_upstream.url,
                    {
                        "ca_file": f["ca.pem"],
                        "cert_file": f[f"{name}.pem"],
                        "key_file": f[f"{name}.key"],
                    },
                )
                for name in ("alice", "bob")
            }
        )
    )
    for prefix in ("/alice", "/bob", "/alice", "/bob"):
        assert sup.request("GET", f"{prefix}/v1/models", AUTH)[0] == 200
    first_a, first_b, second_a, second_b = mtls_upstream.wait_for_requests(4)
    # Same host and port: only the TLS settings tell the pools apart.
    assert first_a.connection_id == second_a.connection_id
    assert first_b.connection_id == second_b.connection_id
    assert first_a.connection_id != first_b.connection_id
    assert mtls_upstream.connections_opened == 2


def test_a_bad_ca_file_on_reload_is_rejected_with_its_path_and_the_last_good_config_serves(
    pki: Pki, mtls_upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    f = pki.files
    good = {"ca_file": f["ca.pem"], "cert_file": f["alice.pem"], "key_file": f["alice.key"]}
    sup = make_supervisor(config({"private": upstream("/private", mtls_upstream.url, good)}))
    assert sup.request("GET", "/private/v1/models", AUTH)[0] == 200
    for bad in ("garbage.pem", "missing.pem"):
        mark = sup.mark()
        tls = {**good, "ca_file": f[bad]}
        sup.write_config(config({"private": upstream("/private", mtls_upstream.url, tls)}))
        line = sup.wait_for_log(r"config rejected", start=mark)
        assert "upstreams.private.tls.ca_file: " in line
        assert sup.request("GET", "/private/v1/models", AUTH)[0] == 200
    sup.wait_for_generation(1)


# -- validation -------------------------------------------------------------------


def tls_doc(tls: object, url: str = "https://127.0.0.1:9443") -> dict[str, Any]:
    return config({"private": {"request_path": "/private", "target_url": url, "tls": tls}})


def problems(tls: object, url: str = "https://127.0.0.1:9443") -> dict[str, str]:
    """path -> message of each problem with the document."""
    return dict(error.split(": ", 1) for error in validate(tls_doc(tls, url)))  # type: ignore[misc]


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
@pytest.mark.parametrize("bad", ["missing.pem", "directory", "garbage.pem"])
def test_a_missing_unreadable_or_garbage_file_is_an_error_naming_its_field(
    pki: Pki, field: str, bad: str
) -> None:
    f = pki.files
    tls = {"ca_file": f["ca.pem"], "cert_file": f["alice.pem"], "key_file": f["alice.key"]}
    tls[field] = f[bad]
    found = problems(tls)
    assert list(found) == [f"upstreams.private.tls.{field}"], found


def test_a_certificate_without_its_key_or_with_another_key_is_an_error(pki: Pki) -> None:
    f = pki.files
    assert list(problems({"cert_file": f["alice.pem"]})) == ["upstreams.private.tls.cert_file"]
    mismatched = {"cert_file": f["alice.pem"], "key_file": f["bob.key"]}
    assert list(problems(mismatched)) == ["upstreams.private.tls.key_file"]
    assert problems({"cert_file": f["alice-with-key.pem"]}) == {}


@pytest.mark.parametrize(
    ("tls", "path"),
    [
        ({"ca_file": "relative/ca.pem"}, "upstreams.private.tls.ca_file"),
        ({"ca_file": ""}, "upstreams.private.tls.ca_file"),
        ({"ca_file": 7}, "upstreams.private.tls.ca_file"),
        ({"verify": "yes"}, "upstreams.private.tls.verify"),
        ({"verfy": False}, "upstreams.private.tls.verfy"),
        ("on", "upstreams.private.tls"),
    ],
)
def test_tls_settings_of_the_wrong_shape_are_errors(tls: object, path: str) -> None:
    assert path in problems(tls)


def test_tls_settings_that_contradict_each_other_are_errors(pki: Pki) -> None:
    f = pki.files
    key_alone = {"key_file": f["alice.key"]}
    assert "upstreams.private.tls.key_file" in problems(key_alone)
    both = {"verify": False, "ca_file": f["ca.pem"]}
    assert "upstreams.private.tls.ca_file" in problems(both)
    plain = problems({"ca_file": f["ca.pem"]}, url="http://127.0.0.1:9000")
    assert "upstreams.private.tls" in plain


def test_no_message_quotes_a_key_file(pki: Pki) -> None:
    f = pki.files
    key_text = Path(f["alice.key"]).read_text()
    # A key given where a certificate belongs, and a CA given where the key belongs.
    for tls in (
        {"cert_file": f["alice.key"]},
        {"cert_file": f["alice.pem"], "key_file": f["ca.pem"]},
    ):
        errors = validate(tls_doc(tls))
        assert errors
        for line in key_text.splitlines()[1:-1]:
            assert not any(line in error for error in errors)


def test_each_upstream_gets_its_own_context_built_once_per_config(pki: Pki) -> None:
    f = pki.files
    doc = config(
        {
            "a": upstream("/a", "https://127.0.0.1:1", {"ca_file": f["ca.pem"]}),
            "b": upstream("/b", "https://127.0.0.1:1", {"ca_file": f["ca.pem"]}),
            "off": upstream("/off", "https://127.0.0.1:1", {"verify": False}),
            "default": upstream("/default", "https://127.0.0.1:1", {"verify": True}),
        }
    )
    assert validate(doc) == []
    a, b, off, default = build_config(doc).upstreams
    assert isinstance(a.tls, ssl.SSLContext) and isinstance(b.tls, ssl.SSLContext)
    assert a.tls is not b.tls
    assert a.tls.verify_mode == ssl.CERT_REQUIRED and a.tls.check_hostname
    assert off.tls is False and default.tls is True
    assert build_config(doc).upstreams[0].tls is not a.tls  # a new generation, new contexts


def test_check_names_the_field_of_a_missing_ca_file(pki: Pki, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "fluxgate.yaml"
    path.write_text(yaml.safe_dump(tls_doc({"ca_file": pki.files["missing.pem"]})))
    result = subprocess.run(
        [str(SCRIPT), "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert f"{path}: upstreams.private.tls.ca_file: cannot be read" in result.stderr
