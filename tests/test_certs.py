import ipaddress
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from consortia.cli import app
from consortia.privacy.certs import (
    CertsError,
    enroll_node,
    enrolled_keys,
    init_consortium,
    issue_server_cert,
)

runner = CliRunner()


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_a_server_cert_for_the_given_hosts(tmp_path):
    root = init_consortium(tmp_path / "c", ["127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((root / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The given hosts, and the loopback names the server's own processes dial it at.
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert mode(root / "ca.key") == 0o600 and mode(root / "server.key") == 0o600


def test_enroll_generates_a_node_pair_and_the_servers_entry(tmp_path):
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    keys = enroll_node(root, "site-a")
    assert mode(keys.private_key) == 0o600
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert enrolled_keys(root)["site-a"].split()[:2] == keys.public_key.read_bytes().split()[:2]
    assert private.public_key().public_numbers() is not None
    with pytest.raises(CertsError, match="already enrolled"):
        enroll_node(root, "site-a")


def test_enroll_accepts_a_key_the_partner_generated(tmp_path):
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    result = runner.invoke(app, ["certs", "keygen", "--out", str(tmp_path / "site")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["certs", "enroll", "site-b", "--dir", str(root),
                                 "--public-key", str(tmp_path / "site" / "node.pub")])
    assert result.exit_code == 0, result.output
    assert "site-b" in enrolled_keys(root) and not (root / "nodes" / "site-b").exists()


def test_one_key_cannot_be_enrolled_under_two_names(tmp_path):
    """The SuperLink registers each key once: a key enrolled twice (a partner's node.pub
    sent for two sites, a NAME.pub copied) made server start fail with Flower's '412
    Precondition Failed', after the results directory held the run."""
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    keys = enroll_node(root, "site-a")
    with pytest.raises(CertsError, match=r"node.pub is already enrolled as node 'site-a'"):
        enroll_node(root, "site-b", keys.public_key)
    assert not (root / "enrolled" / "site-b.pub").exists()
    shutil.copy(root / "enrolled" / "site-a.pub", root / "enrolled" / "site-c.pub")
    with pytest.raises(CertsError, match=r"one key is enrolled under several names in .*: "
                                         r"site-a, site-c; each node needs its own key"):
        enrolled_keys(root)


def test_private_keys_are_never_printed(tmp_path):
    result = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "c"), "--host", "::1"])
    result2 = runner.invoke(app, ["certs", "enroll", "n1", "--dir", str(tmp_path / "c")])
    assert result.exit_code == 0 and result2.exit_code == 0
    assert "PRIVATE KEY" not in result.output + result2.output


def test_the_ca_key_is_sent_offline_and_the_server_starts_without_it(tmp_path):
    from consortia.privacy.certs import check_server_files

    root = tmp_path / "c"
    result = runner.invoke(app, ["certs", "init", "--out", str(root), "--host", "::1"])
    said = " ".join(result.output.split())
    assert "server.key stays on the server; move ca.key offline" in said
    (root / "ca.key").unlink()  # kept by the operator, away from the serving machine
    check_server_files(root)  # what `server start` loads


@pytest.mark.parametrize("name", ["", "../x", "a b", "-a"])
def test_bad_node_names_are_refused_with_what_is_accepted(tmp_path, name):
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    with pytest.raises(CertsError, match="letters, digits"):
        enroll_node(root, name)


def test_bad_host_and_existing_ca_fail_clearly(tmp_path):
    with pytest.raises(CertsError, match="neither an IP address nor a DNS name"):
        init_consortium(tmp_path / "c", ["not a host"])
    init_consortium(tmp_path / "d", ["127.0.0.1"])
    with pytest.raises(CertsError, match="already holds a CA"):
        init_consortium(tmp_path / "d", ["127.0.0.1"])


def test_a_new_server_certificate_comes_from_the_same_ca(tmp_path):
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    old_key = (root / "server.key").read_bytes()
    (root / "server.pem").unlink()  # lost, or a new host name is needed
    result = runner.invoke(app, ["certs", "server", "--dir", str(root), "--host", "127.0.0.1",
                                 "--host", "fl.example.org"])
    assert result.exit_code == 0, result.output
    server = x509.load_pem_x509_certificate((root / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # partners' ca.pem still verifies it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert (root / "server.key").read_bytes() != old_key and mode(root / "server.key") == 0o600
    assert not list(root.glob("*.new"))
    with pytest.raises(CertsError, match="holds no CA.*consortia certs init"):
        issue_server_cert(tmp_path / "elsewhere", ["127.0.0.1"])
    (root / "ca.key").rename(tmp_path / "offline.key")  # kept offline, as advised
    with pytest.raises(CertsError, match="ca.key is missing: signing a server certificate "
                                         "needs the CA's private key"):
        issue_server_cert(root, ["127.0.0.1"])


def test_enrolling_a_private_key_is_refused_saying_so(tmp_path):
    root = init_consortium(tmp_path / "c", ["127.0.0.1"])
    runner.invoke(app, ["certs", "keygen", "--out", str(tmp_path / "site")])
    result = runner.invoke(app, ["certs", "enroll", "site-x", "--dir", str(root),
                                 "--public-key", str(tmp_path / "site" / "node.key")])
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # the terminal wraps long lines
    assert "node.key is a private key; enroll the public half (node.pub)" in said
    assert "site-x" not in enrolled_keys(root)
