"""Certificates and node keys for a deployed federation, built with `cryptography`.

A consortium directory holds:

    ca.pem, ca.key            the consortium's CA (the key signs the server certificate)
    server.pem, server.key    the SuperLink's TLS certificate (SANs: the given hosts/IPs)
    enrolled/NAME.pub         one OpenSSH public key per enrolled partner node: the server
                              registers each with its SuperLink (Flower's node authentication)
    nodes/NAME/               what an operator hands a partner when it generates the key
                              pair for it: node.key, node.pub and ca.pem

Private keys are written 0600 (created with that mode, never world-readable for an
instant) and never printed. Node keys are NIST P-384 EC keys in OpenSSH format, the
format Flower's SuperNode (`--auth-supernode-private-key`) and SuperLink read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    DNSName,
    ExtensionPolicy,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
ENROLLED = "enrolled"
NODES = "nodes"
NODE_KEY, NODE_PUB = "node.key", "node.pub"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CA_DAYS, SERVER_DAYS = 3650, 825


class CertsError(ValueError):
    """A certificate or key request that cannot be done; the message says why."""


@dataclass(frozen=True)
class NodeKeys:
    name: str
    private_key: Path | None  # None when the partner generated the pair itself
    public_key: Path
    enrolled: Path  # the server's entry


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600 from the moment it exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise CertsError(f"{path} exists; refusing to overwrite a private key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # in case the umask narrowed it further, keep it exactly 0600


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# The server's own processes (server start's Control API client, flwr-serverapp) dial the
# SuperLink on its own machine, verifying it against the CA like any partner: server.host
# 0.0.0.0 is dialled at 127.0.0.1, :: at ::1. Every server certificate names them too.
LOOPBACK_HOSTS = ["127.0.0.1", "::1", "localhost"]


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                            r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", host):
            raise CertsError(f"host {host!r} is neither an IP address nor a DNS name; "
                             "accepted: e.g. 127.0.0.1, ::1, fl.example.org")
        names.append(x509.DNSName(host))
    if not names:
        raise CertsError("the server certificate needs at least one host name or IP (--host)")
    for host in LOOPBACK_HOSTS:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        if name not in names:
            names.append(name)
    return x509.SubjectAlternativeName(names)


def _verifier_name(host: str) -> IPAddress | DNSName:
    try:
        return IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return DNSName(host.rstrip("."))
    except ValueError:
        raise CertsError(f"host {host!r} is neither an IP address nor a DNS name; accepted: "
                         "e.g. 127.0.0.1, ::1, fl.example.org") from None


def _server_verifier(ca: x509.Certificate, host: str, at: dt.datetime):
    """cryptography's TLS server verifier, as a partner's TLS handshake checks the server:
    the chain to `ca`, both certificates' validity at `at`, and the name `host` (RFC 6125,
    wildcards included). Its extension policies are relaxed to what TLS itself needs (a CA
    with basicConstraints, a leaf with subjectAltName) rather than the Web PKI's profile,
    so a consortium's own CA that lacks, say, key identifiers still passes, as it does
    with gRPC."""
    return (PolicyBuilder().store(Store([ca])).time(at)
            .extension_policies(
                ca_policy=ExtensionPolicy.permit_all().require_present(
                    x509.BasicConstraints, Criticality.AGNOSTIC, None),
                ee_policy=ExtensionPolicy.permit_all().require_present(
                    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None))
            .build_server_verifier(_verifier_name(host)))


def check_server_names(consortium_dir: str | Path, host: str, setting: str, *,
                       at: dt.datetime | None = None) -> None:
    """The server certificate must be valid for `host`, the address the server's own
    processes dial its SuperLink at: else they never connect, and server start ends in a
    timeout (a certificate from before certs named the loopback addresses). Checked, as
    the SuperLink's clients check it, by cryptography's verifier (`check_server_files`
    has said by then what else is wrong with the certificates, in the operator's terms)."""
    root = Path(consortium_dir)
    [ca, *_] = load_certificates(root / CA_CERT)
    cert = load_certificates(root / SERVER_CERT)[0]
    try:
        _server_verifier(ca, host, at or dt.datetime.now(dt.UTC)).verify(cert, [])
    except VerificationError as err:
        reason = str(err).split(" (encountered processing", 1)[0].removeprefix("validation failed: ")
        raise CertsError(
            f"{root / SERVER_CERT} is not valid for {host}, where server start dials its own "
            f"SuperLink ({setting}): {reason}; issue one that names it, with the names partners "
            f"dial: `consortia certs server --dir {root} --host NAME ...` (it adds "
            f"{', '.join(LOOPBACK_HOSTS)})") from None


def init_consortium(out_dir: str | Path, hosts: list[str], name: str = "consortia") -> Path:
    """Create the CA and the server's certificate (for `hosts`) in `out_dir`."""
    out = Path(out_dir)
    if (out / CA_KEY).exists() or (out / CA_CERT).exists():
        raise CertsError(f"{out} already holds a CA ({CA_CERT}); choose another --out")
    _san(hosts)  # a bad host fails before anything is written
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384()))
    write_private(out / CA_KEY, _pem_key(ca_key))
    write_public(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    issue_server_cert(out, hosts)
    (out / ENROLLED).mkdir(exist_ok=True)
    return out


def issue_server_cert(consortium_dir: str | Path, hosts: list[str]) -> Path:
    """A new server certificate and key for `hosts`, signed by the consortium's CA, in
    place of any there (a lost key, a new host name, or a renewal before the SERVER_DAYS
    run out). Partners trust the CA, not this certificate: they need nothing new."""
    root = Path(consortium_dir)
    if not (root / CA_CERT).is_file():
        raise CertsError(f"{root} holds no CA ({CA_CERT} and {CA_KEY}); create one with "
                         f"`consortia certs init --out {root} --host HOST`")
    if not (root / CA_KEY).is_file():
        raise CertsError(f"{root / CA_KEY} is missing: signing a server certificate needs the "
                         "CA's private key; bring it back from where it is kept offline")
    san = _san(hosts)
    ca_key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
    now = dt.datetime.now(dt.UTC)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip())]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384()))
    # Written beside, then moved into place: a server never reads a half-written pair.
    fresh_key = root / (SERVER_KEY + ".new")
    fresh_key.unlink(missing_ok=True)
    write_private(fresh_key, _pem_key(server_key))
    fresh_cert = root / (SERVER_CERT + ".new")
    write_public(fresh_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    os.replace(fresh_key, root / SERVER_KEY)
    os.replace(fresh_cert, root / SERVER_CERT)
    return root / SERVER_CERT


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise CertsError(f"node name {name!r} is not accepted: use 1-64 letters, digits, '.', "
                         "'_' or '-', starting with a letter or digit")
    return name


def generate_node_key(out_dir: str | Path) -> tuple[Path, Path]:
    """A fresh node key pair (OpenSSH, P-384) in out_dir: node.key (0600) and node.pub."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    write_private(out / NODE_KEY, private)
    write_public(out / NODE_PUB, public_key_line(key.public_key()))
    return out / NODE_KEY, out / NODE_PUB


def public_key_line(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertsError(f"public key file not found: {path}") from None
    if b"PRIVATE KEY" in data:
        raise CertsError(f"{path} is a private key; enroll the public half (node.pub). A "
                         "private key that left its site should be replaced: the partner runs "
                         "`consortia certs keygen` again and sends the new node.pub")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertsError(f"{path} is not an OpenSSH public key: {err}; accepted: the node.pub "
                         "line `consortia certs keygen` writes (ecdsa-sha2-nistp384 ...)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertsError(f"{path} holds a {type(key).__name__}; accepted: a NIST EC key "
                         "(e.g. from `consortia certs keygen`)")
    return key


# Every key and certificate the SuperLink and a SuperNode are started with is loaded here
# first: either process, given a file it cannot use, says so only in its own log (a
# SuperNode waits forever on a CA it cannot read, and restarts forever on a key it cannot
# parse).

def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """The PEM certificates in `path` (one, or a bundle), as gRPC's TLS reads them."""
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        raise CertsError(f"{path} is not a PEM certificate; accepted: one or more "
                         "-----BEGIN CERTIFICATE----- blocks") from None


def load_node_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A node's private key as Flower's SuperNode loads it (--auth-supernode-private-key):
    an unencrypted OpenSSH EC private key."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        found = ("a public key (node.pub?), not the private half"
                 if data.lstrip().startswith((b"ecdsa-", b"ssh-", b"-----BEGIN PUBLIC"))
                 else f"not an unencrypted OpenSSH private key ({err})")
        raise CertsError(f"{path} is {found}; accepted: node.key from `consortia certs "
                         "keygen` or the operator's `certs enroll` (-----BEGIN OPENSSH "
                         "PRIVATE KEY-----, an EC key)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{path} holds a {type(key).__name__}; accepted: a NIST EC key "
                         "(e.g. from `consortia certs keygen`)")
    return key


def check_validity(cert: x509.Certificate, path: Path, remedy: str, *,
                   at: dt.datetime | None = None) -> None:
    """Fail, saying when, if `cert` (read from `path`) is outside its validity period at
    `at` (now): a TLS handshake refuses it then. cryptography's verifier checks the same
    and says only "cert is not valid at validation time"; the operator needs the date and
    what to do (`remedy`)."""
    at = at or dt.datetime.now(dt.UTC)
    if at > cert.not_valid_after_utc:
        raise CertsError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
                         f"and TLS refuses an expired certificate; {remedy}")
    if at < cert.not_valid_before_utc:
        raise CertsError(f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                         f" UTC, after this machine's clock ({at:%Y-%m-%d %H:%M} UTC); check "
                         "the clock")


def check_server_files(consortium_dir: str | Path, *,
                       at: dt.datetime | None = None) -> None:
    """Load ca.pem, server.pem and server.key as the SuperLink will, and check that the key
    is the certificate's, the certificate the CA's, and both within their validity at `at`
    (now): partners verify the server against the CA, so a certificate from another CA, or
    an expired one, turns every partner away."""
    root = Path(consortium_dir)
    [ca, *_] = load_certificates(root / CA_CERT)
    cert = load_certificates(root / SERVER_CERT)[0]
    try:
        key = serialization.load_pem_private_key((root / SERVER_KEY).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertsError(f"{root / SERVER_KEY} is not an unencrypted PEM private key ({err}); "
                         f"issue a new one with `consortia certs server --dir {root} "
                         "--host HOST`") from None
    if key.public_key() != cert.public_key():
        raise CertsError(f"{root / SERVER_KEY} is not the key of {root / SERVER_CERT}; issue "
                         f"a matching pair with `consortia certs server --dir {root} --host HOST`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertsError(f"{root / SERVER_CERT} was not issued by {root / CA_CERT}, the CA "
                         f"partners verify it against; issue one from it with `consortia certs "
                         f"server --dir {root} --host HOST`") from None
    check_validity(ca, root / CA_CERT, "a new CA means a new consortium: `consortia certs init "
                   "--out NEWDIR --host HOST`, with every partner given its ca.pem", at=at)
    check_validity(cert, root / SERVER_CERT, "renew it from the CA (partners need nothing new): "
                   f"`consortia certs server --dir {root} --host HOST ...`", at=at)


def enroll_node(consortium_dir: str | Path, name: str,
                public_key: str | Path | None = None) -> NodeKeys:
    """Enroll partner node `name`: record its public key in enrolled/NAME.pub.

    With `public_key` (the partner generated its pair with `consortia certs keygen` and
    sent only the public half) that key is enrolled; otherwise a pair is generated into
    nodes/NAME/ together with a copy of the CA certificate, for the operator to hand over.
    """
    root = Path(consortium_dir)
    check_name(name)
    if not (root / CA_CERT).is_file():
        raise CertsError(f"{root} holds no {CA_CERT}; run `consortia certs init --out {root}` "
                         "first")
    enrolled = root / ENROLLED / f"{name}.pub"
    if enrolled.exists():
        raise CertsError(f"node {name!r} is already enrolled ({enrolled})")
    private = None
    if public_key is None:
        node_dir = root / NODES / name
        private, public = generate_node_key(node_dir)
        write_public(node_dir / CA_CERT, (root / CA_CERT).read_bytes())
    else:
        public = Path(public_key)
    line = public_key_line(load_node_public_key(public))
    for other, known in enrolled_keys(root).items():
        if known == line:  # the SuperLink registers each key once: server start would fail
            raise CertsError(f"{public} is already enrolled as node {other!r} "
                             f"({root / ENROLLED / (other + '.pub')}); each node needs its own "
                             "key: the partner runs `consortia certs keygen` for this one")
    write_public(enrolled, line + b"\n")
    return NodeKeys(name=name, private_key=private, public_key=public, enrolled=enrolled)


def enrolled_keys(consortium_dir: str | Path) -> dict[str, bytes]:
    """name -> OpenSSH public key line of every enrolled node."""
    folder = Path(consortium_dir) / ENROLLED
    keys = {p.stem: public_key_line(load_node_public_key(p))
            for p in sorted(folder.glob("*.pub"))}
    names: dict[bytes, list[str]] = {}
    for name, line in keys.items():
        names.setdefault(line, []).append(name)
    shared = [found for found in names.values() if len(found) > 1]
    if shared:  # the SuperLink refuses a key registered twice (412), after the run was made
        raise CertsError("one key is enrolled under several names in "
                         f"{folder}: {'; '.join(', '.join(found) for found in shared)}; each "
                         "node needs its own key: remove all but one of each such NAME.pub and "
                         "enroll the others' own keys (`consortia certs keygen` at their site)")
    return keys
