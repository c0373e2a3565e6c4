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


@pytest.mark.parametrize("host, valid", [
    ("fl.example.org", True), ("FL.Example.ORG", True), ("fl.example.org.", True),
    ("a.lab.example.org", True), ("203.0.113.7", True), ("127.0.0.1", True), ("::1", True),
    ("localhost", True),
    ("example.org", False), ("lab.example.org", False), ("b.a.lab.example.org", False),
    ("203.0.113.8", False), ("other.org", False), ("::2", False),
])
def test_the_server_name_is_checked_as_tls_checks_it(tmp_path, host, valid):
    """cryptography's verifier decides, wildcards and case as RFC 6125 has them."""
    from consortia.privacy.certs import check_server_names

    root = init_consortium(tmp_path / "c", ["fl.example.org", "*.lab.example.org",
                                            "203.0.113.7"])
    if valid:
        check_server_names(root, host, "server.host")
    else:
        with pytest.raises(CertsError, match=rf"server.pem is not valid for {host}, where server "
                                             r"start dials its own SuperLink \(server.host\): "
                                             r"leaf certificate has no matching subjectAltName"):
            check_server_names(root, host, "server.host")


def test_a_consortium_ca_of_its_own_making_needs_only_what_tls_needs(tmp_path):
    """A CA made with other tools, without the key identifiers and key usages the Web
    PKI's profile asks for, serves as gRPC lets it: the checks do not ask for more."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from consortia.privacy.certs import check_server_files, check_server_names, write_private

    now = dt.datetime.now(dt.UTC)
    root = tmp_path / "c"
    root.mkdir()
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab CA")])

    def cert(subject, key, *extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=30)))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    (root / "ca.pem").write_bytes(cert(ca_name, ca_key, x509.BasicConstraints(True, None)))
    (root / "server.pem").write_bytes(cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl")]), server_key,
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])))
    write_private(root / "server.key", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    check_server_files(root)
    check_server_names(root, "127.0.0.1", "server.host")
    with pytest.raises(CertsError, match="not valid for ::1"):
        check_server_names(root, "::1", "server.host")
