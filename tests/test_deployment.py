"""A deployed federation as separate OS processes on 127.0.0.1: a SuperLink (TLS, node
authentication) run by `consortia server start`, and one SuperNode per partner run by
`consortia client join`; DP training with secure aggregation; crashes of a client and of
the server; nodes and certificates the server must turn away."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl

import pytest
from deploy_harness import Federation, jsonl, kill_tree, tail, wait_until

from consortia.privacy.certs import generate_node_key, init_consortium
from consortia.server.deploy import base_model_sha256
from consortia.server.store import RunStore, default_store_url
from consortia.server.superlink import SuperLink

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(sites=SITES, **kwargs) -> Federation:
        fed = Federation(tmp_path, sites, **kwargs)
        feds.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in feds:
            fed.close()


def spends(ledger: dict) -> list[dict]:
    return [e for e in ledger["events"] if e["decision"] == "trained"]


# site-a's share of the digits (as its partition 0 of 3), in a partner's own script.
SITE_A_SHARE = """
import numpy as np
from consortia.client import join_federation
from consortia.tasks import get_task

x, y = get_task("digits-mlp").load_data(None).train.tensors
mine = np.array_split(np.random.default_rng(0).permutation(len(y)), 3)[0]
"""

PYTHON_API_CLIENT = SITE_A_SHARE + """
from torch.utils.data import TensorDataset
join_federation("site-a.toml", dataset=TensorDataset(x[mine], y[mine]))
"""

# site-a through the Python API with a dataset that takes its time (10 ms a record, so a
# round's training takes seconds) and says when training began (a file in the working
# directory): its SuperNode can be killed while a task is running.
SLOW_CLIENT = SITE_A_SHARE + """
import time
from pathlib import Path
from torch.utils.data import Dataset

class Slow(Dataset):
    reads = 0

    def __len__(self):
        return len(mine)

    def __getitem__(self, i):
        Slow.reads += 1
        # training, not joining's check at start (every record's label once, 8 records more)
        if Slow.reads > len(mine) + 50:
            Path("site-a-training").touch()
        time.sleep(0.01)
        return x[mine[i]], y[mine[i]]

join_federation("site-a.toml", dataset=Slow())
"""


def write_partition_csv(path, index: int, count: int) -> None:
    import numpy as np

    from consortia.tasks import get_task

    x, y = get_task("digits-mlp").load_data(None).train.tensors
    share = np.array_split(np.random.default_rng(0).permutation(len(y)), count)[index]
    header = ",".join([f"px{i}" for i in range(64)] + ["label"])
    rows = [",".join([f"{v:.6f}" for v in x[i].tolist()] + [str(int(y[i]))]) for i in share]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def check_tls_handshakes(fed: Federation, other_ca) -> None:
    """The consortium's CA verifies the SuperLink; another CA fails the handshake."""
    right = ssl.create_default_context(cafile=str(fed.certs / "ca.pem"))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as sock, \
            right.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    wrong = ssl.create_default_context(cafile=str(other_ca / "ca.pem"))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            wrong.wrap_socket(sock, server_hostname="127.0.0.1")


def submit_rogue_run_and_node(fed: Federation):
    """What anyone who reaches the port could ask of Flower's open Control API: run a
    bundle of their own code, and register a node key of their own."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import RegisterNodeRequest, StartRunRequest
    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    marker = fed.root / "rogue-code-ran"
    app = fed.root / "rogue-app"
    app.mkdir()
    (app / "rogue_app.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "rogue"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "rogue"\n[tool.flwr.app.components]\n'
        'serverapp = "rogue_app:app"\nclientapp = "rogue_app:app"\n')
    fab_bytes = build_fab_from_disk(app)
    control = SuperLink(fed.certs, "127.0.0.1", fed.port, fed.root / "rogue").control()
    try:
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        run = control.StartRun(StartRunRequest(fab=fab_to_proto(fab), federation="",
                                               override_config=user_config_to_proto({}))).run_id
        _, public = generate_node_key(fed.root / "rogue-node")
        key = public_key_to_bytes(load_ssh_public_key(public.read_bytes()))
        node = control.RegisterNode(RegisterNodeRequest(public_key=key, name="rogue")).node_id
    finally:
        control.close()
    return run, node, marker


def node_status(link: SuperLink, node_id: int) -> str:
    from flwr.proto.control_pb2 import ListNodesRequest

    client = link.control()
    try:
        return next((n.status for n in client.ListNodes(ListNodesRequest()).nodes_info
                     if n.node_id == node_id), "")
    finally:
        client.close()


def advertisement_sent(log) -> bool:
    text = log.read_text() if log.exists() else ""
    at = text.find("Sending: train.secagg_advertise")
    return at >= 0 and "Sent successfully" in text[at:]


def checkpoint_sha(fed: Federation, r: int) -> str:
    return hashlib.sha256((fed.out / "checkpoints" / f"round-{r:05d}.safetensors").read_bytes()
                          ).hexdigest()


def test_two_dp_secagg_rounds_over_tls_refuse_strangers_and_policy(federation):
    """Three partners train two rounds (DP, secure aggregation); a fourth partner's policy
    refuses the task; a node that is not enrolled and a node that trusts another CA never
    get in (a wrong CA fails the TLS handshake); a run or a node key submitted through the
    Control API by anyone else is stopped or unregistered, its code never run."""
    fed = federation(sites=SITES + ["site-d"])
    # site-a joins through the Python API with a Dataset of its own; site-b reads a CSV
    # file; site-c uses its share of the task's data; site-d's policy wants more noise
    # than the run's σ = 1.0.
    fed.write_site("site-a", 0, 3)
    fed.write_site("site-b", 1, 3, data={"kind": "csv", "path": "site-b.csv"})
    write_partition_csv(fed.root / "site-b.csv", 1, 3)
    base = base_model_sha256(fed.root / "server.toml")  # what the operator publishes
    fed.write_site("site-c", 2, 3, base_model_sha256=[base], require_secagg=True)
    fed.write_site("site-d", 0, 3, min_noise_multiplier=2.0)
    fed.start_server()
    fed.join_python("site-a", PYTHON_API_CLIENT)
    for name in ["site-b", "site-c", "site-d"]:
        fed.join(name)
    stranger = fed.plain_supernode("stranger", fed.stranger_key("stranger"),
                                   fed.certs / "ca.pem")
    other_ca = init_consortium(fed.root / "other-ca", ["127.0.0.1"])
    wrong_ca = fed.plain_supernode("wrong-ca", fed.stranger_key("wrong-ca-key"),
                                   other_ca / "ca.pem")
    wait_until(lambda: (fed.out / "deployment.json").exists(), 90, "the run to be submitted",
               fed.logs(), fed.server)
    check_tls_handshakes(fed, other_ca)
    rogue_run, rogue_node, marker = submit_rogue_run_and_node(fed)
    control = SuperLink(fed.certs, "127.0.0.1", fed.port, fed.root / "rogue")
    wait_until(lambda: control.run_status(rogue_run)[:2] == ("finished", "stopped"), 60,
               "the server to stop a run it did not submit", fed.logs(), fed.server)
    wait_until(lambda: node_status(control, rogue_node) == "unregistered", 60,
               "the server to unregister a node it did not enroll", fed.logs(), fed.server)

    assert fed.wait_server_exit() == 0, (fed.root / "server.out").read_text()
    assert not marker.exists()  # the rogue bundle's ServerApp never ran
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["secagg_status"] == "ok"
        assert row["clients_trained"] == 3 and row["clients_refused"] == 1
    assert checkpoint_sha(fed, 2) != checkpoint_sha(fed, 0)  # the global model changed
    assert checkpoint_sha(fed, 0) == base
    store = RunStore(default_store_url(fed.out))  # the operator's records call it a deployment
    try:
        (run,) = store.list_runs()
        assert run["kind"] == "deployment" and run["status"] == "completed"
        started = [e for e in store.audit_log(run["run_id"]) if e["event"] == "run-started"]
        assert started and started[0]["detail"].startswith("deployment of ")
    finally:
        store.close()
    for name in SITES:
        events = spends(fed.ledger(name))
        assert [e["round"] for e in events] == [1, 2]
        assert 0 < events[0]["epsilon"] < events[1]["epsilon"] <= 20.0
        # Its answer to the key advertisement (it can train a round), then its rounds.
        assert [e["decision"] for e in fed.audit(name)] == ["advertised", "trained", "trained"]
        assert fed.audit(name)[0]["can_train"] is True
    said, *refused = fed.audit("site-d")
    assert said["decision"] == "advertised"
    assert [e["decision"] for e in refused] == ["refused-policy", "refused-policy"]
    assert "below this site's minimum 2" in refused[0]["reason"]
    assert refused[0]["asked"]["noise_multiplier"] == 1.0 and refused[0]["run"]
    assert not (fed.state("site-d") / "privacy_ledger.json").exists() or \
        not spends(fed.ledger("site-d"))

    # Only the four enrolled partners ever joined; the stranger was refused by the
    # SuperLink's node authentication, the wrong-CA node by the TLS handshake.
    participation = {r["client_id"] for r in jsonl(fed.out / "participation.jsonl")}
    assert participation == set(SITES + ["site-d"])
    assert "SuperNode ID" not in stranger.read_text()
    wait_until(lambda: "Failed to activate SuperNode" in stranger.read_text(), 60,
               "the stranger to be turned away", [stranger])
    assert "SuperNode ID" not in wrong_ca.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.read_text()


def test_a_client_killed_during_a_round_drops_and_the_run_goes_on(federation):
    fed = federation(rounds=3)
    for i, name in enumerate(SITES):
        fed.write_site(name, i, 3)
    fed.start_server()
    for name in SITES:
        fed.join(name)
    # Once site-c's key advertisement has left its SuperNode, round 1 is under way: kill
    # the whole client (join and its SuperNode) before its train request can come back.
    wait_until(lambda: advertisement_sent(fed.state("site-c") / "supernode.log"), 180,
               "site-c's key advertisement", fed.logs(), fed.server)
    kill_tree(fed.clients["site-c"])
    [first] = fed.wait_rounds(1)
    assert first["secagg_status"] == "ok" and first["clients_trained"] == 2
    assert first["secagg_dropped"] == 1 and first["clients_failed"] == 1
    assert checkpoint_sha(fed, 1) != checkpoint_sha(fed, 0)  # the survivors' sum was applied
    # It never trained (it had only answered the key advertisement).
    assert [e["decision"] for e in fed.audit("site-c")] == ["advertised"]
    fed.join("site-c")  # the partner restarts its client; the run goes on, with it again
    assert fed.wait_server_exit() == 0, (fed.root / "server.out").read_text()
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["secagg_status"] == "ok" and r["clients_trained"] >= 2 for r in rows)
    assert rows[2]["clients_trained"] == 3
    trained = [e["round"] for e in fed.audit("site-c") if e["decision"] == "trained"]
    assert 3 in trained and [e["round"] for e in spends(fed.ledger("site-c"))] == trained
    # Round 1's request expired with the round: back, site-c did not train for it.
    assert 1 not in [e["round"] for e in fed.audit("site-c")]


def test_a_server_killed_mid_run_resumes_without_resetting_or_recounting_ledgers(federation):
    fed = federation()
    for i, name in enumerate(SITES):
        fed.write_site(name, i, 3)
    fed.start_server()
    for name in SITES:
        fed.join(name)
    # Round 2 is under way once a client has trained it: the server crashes then.
    wait_until(lambda: any(e["round"] == 2 for e in fed.audit("site-a")), 240,
               "round 2 to start", fed.logs())
    kill_tree(fed.server)
    before = {name: spends(fed.ledger(name)) for name in SITES}
    assert [r["round"] for r in fed.metrics()] == [1]

    fed.start_server(resume=True)
    assert fed.wait_server_exit() == 0, (fed.root / "server.out").read_text()
    # No partner's client left the federation: each SuperNode was refused by the new
    # SuperLink and started again, and a task it forgot failed without ending the client.
    left = [name for name, proc in fed.clients.items() if proc.poll() is not None]
    assert left == [], "\n".join(tail(fed.root / f"{name}.out") for name in left)
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2]  # round 1 kept, round 2 run once more
    assert rows[1]["clients_trained"] == 3
    manifest = json.loads((fed.out / "checkpoints" / "round-00002.json").read_text())
    assert manifest["parent_sha256"] == checkpoint_sha(fed, 1)
    for name in SITES:
        after = spends(fed.ledger(name))
        assert after[:len(before[name])] == before[name]  # nothing reset or rewritten
        trained = [e for e in fed.audit(name) if e["decision"] == "trained"]
        assert len(after) == len(trained)  # one spend per training, none counted twice
        assert after[-1]["round"] == 2 and after[-1]["epsilon"] >= before[name][-1]["epsilon"]


def test_a_supernode_restarted_mid_task_costs_that_reply_not_the_client(federation):
    fed = federation(rounds=3)
    for i, name in enumerate(SITES):
        fed.write_site(name, i, 3)
    fed.start_server()
    fed.join_python("site-a", SLOW_CLIENT)
    for name in SITES[1:]:
        fed.join(name)
    # site-a's SuperNode crashes while its ClientApp trains round 1. `client join` starts it
    # again; the SuperLink refuses the new one until the old one's heartbeat has expired,
    # and then it does not know the task that was running (401 to all its calls).
    wait_until(lambda: (fed.root / "site-a-training").exists(), 240,
               "site-a's round-1 training", fed.logs(), fed.server)
    os.kill(fed.supernode_pid("site-a"), signal.SIGKILL)
    assert fed.wait_server_exit() == 0, (fed.root / "server.out").read_text()

    assert fed.clients["site-a"].poll() is None, tail(fed.root / "site-a.out")
    assert "site-a: online" in (fed.root / "server.out").read_text()  # what the operator saw
    out = (fed.root / "site-a.out").read_text()
    assert "the SuperNode exited (-9); starting it again" in out
    assert "[code: 2004] Failed to activate SuperNode." in out  # why the restarts were refused
    assert "could not be completed" in out or "no longer knows this task" in out, out
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["secagg_status"] == "ok" for r in rows)
    assert rows[0]["clients_trained"] == 2 and rows[0]["secagg_dropped"] == 1  # its reply lost
    assert rows[2]["clients_trained"] == 3  # and it is back
    # Every training counts against its budget, the one whose reply was lost too.
    trained = [e["round"] for e in fed.audit("site-a") if e["decision"] == "trained"]
    assert trained[0] == 1 and 3 in trained
    assert [e["round"] for e in spends(fed.ledger("site-a"))] == trained
