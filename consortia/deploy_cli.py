"""`consortia certs`, `consortia server` and `consortia client`: a deployed federation.

Thin: each command parses its options and calls the room that does the work
(privacy/certs.py, server/deploy.py, client/join.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

from consortia.privacy.display import epsilon_text
from consortia.terminal import console, fail, say

certs_app = typer.Typer(help="Certificates and node keys (operators; partners: keygen).",
                        no_args_is_help=True)
server_app = typer.Typer(help="The federation's server: a SuperLink and the consortia ServerApp.",
                         no_args_is_help=True)
client_app = typer.Typer(help="A partner's client: a SuperNode running the installed ClientApp.",
                         no_args_is_help=True)


@contextlib.contextmanager
def certs_errors() -> Iterator[None]:
    """A refused certificate or key request ends the command with its reason (exit 2)."""
    from consortia.privacy.certs import CertsError

    try:
        yield
    except CertsError as err:
        raise fail(err) from None


# The server certificate's names (certs init, certs server): what partners dial.
HostsOption = typer.Option(..., "--host", help="a DNS name or IP the server is reached at (repeat)")


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="consortium directory to create"),
    hosts: list[str] = HostsOption,
) -> None:
    """Create the consortium CA and the server's TLS certificate (private keys 0600)."""
    from consortia.privacy.certs import init_consortium

    with certs_errors():
        root = init_consortium(out, hosts)
    typer.echo(f"CA and server certificate in {root.resolve()} (ca.pem, server.pem; keys "
               "0600): server.key stays on the server; move ca.key offline, to the consortium "
               "operator's keeping (the server never needs it; `certs server` does)")


@certs_app.command("server")
def certs_server(
    consortium: Path = typer.Option(..., "--dir", help="the consortium directory (certs init)"),
    hosts: list[str] = HostsOption,
) -> None:
    """Issue a new server certificate from the consortium CA (lost key, new host names,
    renewal); partners trust the CA and need nothing new."""
    from consortia.privacy.certs import issue_server_cert

    with certs_errors():
        cert = issue_server_cert(consortium, hosts)
    typer.echo(f"server certificate {cert} (key server.key, 0600) for {', '.join(hosts)}; "
               "the next `consortia server start` serves it")


@certs_app.command("enroll")
def certs_enroll(
    name: str = typer.Argument(..., help="the partner node's name"),
    consortium: Path = typer.Option(..., "--dir", help="the consortium directory (certs init)"),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="enroll this OpenSSH public key (from the partner's "
                                   "`consortia certs keygen`) instead of generating a pair"),
) -> None:
    """Enroll a partner node: the server will accept it (Flower node authentication)."""
    from consortia.privacy.certs import enroll_node

    with certs_errors():
        keys = enroll_node(consortium, name, public_key)
    typer.echo(f"enrolled {name}: {keys.enrolled}")
    if keys.private_key is not None:
        typer.echo(f"hand {keys.private_key.parent} (node.key, node.pub, ca.pem) to the partner "
                   "over a secure channel; node.key is its private key")


@certs_app.command("keygen")
def certs_keygen(out: Path = typer.Option(..., "--out", help="directory for node.key / node.pub")
                 ) -> None:
    """Generate this site's node key pair; send only node.pub to the operator."""
    from consortia.privacy.certs import generate_node_key

    with certs_errors():
        private, public = generate_node_key(out)
    typer.echo(f"private key {private} (0600, stays here); send {public} to the operator")


@server_app.command("start")
def server_start(
    config: Path = typer.Option(..., "--config", help="server TOML (its server and run tables)"),
    resume: bool = typer.Option(False, "--resume",
                                help="continue the run in the configured out directory"),
) -> None:
    """Start the SuperLink (TLS, node authentication) and run the configured federation."""
    from consortia.config import ConfigError
    from consortia.server.deploy import DeploymentError, serve

    try:
        summary = serve(config, resume=resume, log=say)
    except (ConfigError, DeploymentError) as err:
        raise fail(err) from None
    acc = summary.get("final_accuracy")
    console.print(f"final accuracy {acc:.4f}" if acc is not None else "no round completed")
    done, planned = summary.get("rounds_completed"), summary.get("config", {}).get("rounds")
    if done is not None and planned is not None and done < planned:  # `consortia runs stop`
        console.print(f"the run stopped after round {done} of {planned}; continue it with: "
                      f"consortia server start --config {config} --resume")


@server_app.command("base-hash")
def server_base_hash(config: Path = typer.Option(..., "--config", help="server TOML")) -> None:
    """Print the SHA-256 of the run's base model, for partners' base_model_sha256."""
    from consortia.config import ConfigError
    from consortia.server.deploy import base_model_sha256

    try:
        typer.echo(base_model_sha256(config))
    except ConfigError as err:
        raise fail(err) from None


@client_app.command("join")
def client_join(config: Path = typer.Option(..., "--config", help="site TOML")) -> None:
    """Join a federation: a SuperNode for this site, running only the installed ClientApp."""
    from consortia.client.join import JoinError, join
    from consortia.config import ConfigError

    try:
        join(config, log_fn=say)
    except (ConfigError, JoinError) as err:
        raise fail(err) from None


@client_app.command("status")
def client_status(config: Path = typer.Option(..., "--config", help="site TOML"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """This site's own records: ε spent against its budget, and its audit log."""
    import json

    from consortia.client.api import site_status
    from consortia.config import ConfigError
    from consortia.privacy.dp import LedgerMismatchError

    try:
        status = site_status(config)
    except ConfigError as err:
        raise fail(err) from None
    except LedgerMismatchError as err:  # damaged, or kept under another δ or accountant
        raise fail(f"this site's privacy ledger: {err}") from None
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(f"{status['site']}: ε {epsilon_text(status['epsilon'], 4)} of {status['epsilon_budget']} "
               f"(δ {status['delta']}, {status['accountant']}), {status['steps']} DP-SGD steps")
    if status["epsilon_if_secagg_fails"] is not None:  # distributed DP's second guarantee
        cap = status["max_epsilon_if_secagg_fails"]
        typer.echo(f"  ε if secure aggregation fails {epsilon_text(status['epsilon_if_secagg_fails'], 4)}"
                   + (f" of cap {cap}" if cap is not None else " (no cap in [policy])"))
    if status["audit_damaged_lines"]:
        typer.echo(f"warning: audit.jsonl line(s) {', '.join(map(str, status['audit_damaged_lines']))}"
                   " cannot be read (cut short by a crash?) and are left out")
    for e in status["audit"][-20:]:
        typer.echo(f"  run {e['run']} round {e['round']}: {e['decision']}"
                   + (f" ({e['reason']})" if e["reason"] else ""))
