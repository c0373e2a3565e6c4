"""server.toml fails at start naming what is wrong; the app bundle a run is submitted
with carries no code, only the names of installed consortia apps."""

import datetime as dt
import importlib
import shutil
import tomllib

import pytest
from deploy_harness import resign
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from consortia.config import ConfigError
from consortia.privacy.certs import enroll_node, init_consortium
from consortia.server.deploy import base_model_sha256
from consortia.server.deploy_config import load_server_config
from consortia.server.superlink import app_bundle_files

SERVER = """
[server]
port = {port}
certs = "consortium"
out = "results"

[run]
task = "digits-mlp"
clients = 3
clients_per_round = 3
"""


def server_toml(tmp_path, port=9093, extra=""):
    path = tmp_path / "server.toml"
    path.write_text(SERVER.format(port=port) + extra)
    return path


def enroll_run_clients(tmp_path, count=3):
    """The run.clients = 3 nodes SERVER's run waits for (fewer fail at start)."""
    for i in range(count):
        enroll_node(tmp_path / "consortium", f"site-{'abc'[i]}")


def test_paths_are_read_from_the_configs_folder_and_files_are_checked(tmp_path):
    cfg = load_server_config(server_toml(tmp_path))
    assert cfg.server.certs == tmp_path / "consortium" and cfg.server.out == tmp_path / "results"
    with pytest.raises(ConfigError, match="ca.pem is missing; create it with `consortia certs init"):
        cfg.check_files()
    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    with pytest.raises(ConfigError, match="no enrolled node"):
        cfg.check_files()
    enroll_node(tmp_path / "consortium", "site-a")
    # The run waits for run.clients = 3 nodes: with one enrolled it would never start.
    with pytest.raises(ConfigError, match=r"run.clients = 3, but 1 node\(s\) are enrolled in "
                                          r".*\(site-a\).*accepted: run.clients ≤ 1"):
        cfg.check_files()
    for name in ("site-b", "site-c"):
        enroll_node(tmp_path / "consortium", name)
    cfg.check_files()
    (tmp_path / "consortium" / "server.pem").unlink()  # the CA stays: a new certificate from it
    with pytest.raises(ConfigError, match="server.pem is missing; issue a new one from the CA "
                                          "with `consortia certs server --dir"):
        cfg.check_files()


@pytest.mark.parametrize("damage, message", [
    (lambda c, other: (c / "ca.pem").write_text("x"), "ca.pem is not a PEM certificate"),
    (lambda c, other: (c / "server.key").write_text("x"),
     "server.key is not an unencrypted PEM private key"),
    (lambda c, other: shutil.copy(other / "server.key", c / "server.key"),
     "server.key is not the key of {c}/server.pem"),
    (lambda c, other: [shutil.copy(other / n, c / n) for n in ("server.key", "server.pem")],
     "server.pem was not issued by {c}/ca.pem, the CA partners verify it against"),
])
def test_server_certs_the_superlink_cannot_serve_fail_at_start(tmp_path, damage, message):
    certs = init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    other = init_consortium(tmp_path / "other", ["127.0.0.1"])
    enroll_node(certs, "site-a")
    cfg = load_server_config(server_toml(tmp_path))
    damage(certs, other)
    with pytest.raises(ConfigError) as err:
        cfg.check_files()
    assert str(err.value).startswith("server.certs: ")
    assert message.format(c=certs) in str(err.value)


@pytest.mark.parametrize("port, extra, message", [
    (70000, "", "server.port: Input should be less than or equal to 65535"),
    (9093, "\n[run.privacy]\nepsilon_budjet = 2\n", "run.privacy.epsilon_budjet: unknown key"),
    (9093, "\n[run.secagg]\nenabled = true\nbits = 31\n", "secagg.bits = 31"),
    # [server] as strict as [run]: a TOML string is no port, inf no timeout
    ('"9093"', "", "server.port: Input should be a valid integer"),
    ("9093\nstart_timeout_s = inf", "",
     "server.start_timeout_s: Input should be a finite number"),
])
def test_a_bad_server_config_fails_naming_the_key(tmp_path, port, extra, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_server_config(server_toml(tmp_path, port, extra))


def test_task_modules_that_cannot_be_imported_fail_at_start(tmp_path):
    path = server_toml(tmp_path)
    path.write_text(path.read_text().replace('out = "results"',
                                             'out = "results"\ntask_modules = ["no_such_mod"]'))
    with pytest.raises(ConfigError, match="server.task_modules: cannot import 'no_such_mod'"):
        load_server_config(path)


def test_task_modules_beside_server_toml_are_imported(tmp_path, monkeypatch):
    """A module beside server.toml (the operator's own task) could not be imported by
    `consortia server start` nor its flwr-serverapp: no working directory on sys.path."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir("/")
    (tmp_path / "our_tasks_beside.py").write_text("LOADED = True\n")
    path = server_toml(tmp_path)
    path.write_text(path.read_text().replace('out = "results"',
                                             'out = "results"\ntask_modules = ["our_tasks_beside"]'))
    load_server_config(path)
    assert sys.modules["our_tasks_beside"].LOADED


def test_the_app_bundle_names_installed_apps_and_carries_no_code(tmp_path):
    files = app_bundle_files(tmp_path / "server.toml", resume=True)
    assert list(files) == ["pyproject.toml"]
    app = tomllib.loads(files["pyproject.toml"].decode())["tool"]["flwr"]["app"]
    assert app["config"] == {"server-config": str(tmp_path / "server.toml"), "resume": True}
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for component, ref in app["components"].items():
        module, _, attr = ref.partition(":")
        assert module.startswith("consortia.")
        assert isinstance(getattr(importlib.import_module(module), attr), kinds[component])


def test_base_hash_is_deterministic_and_depends_on_the_seed(tmp_path):
    path = server_toml(tmp_path)
    seed0 = base_model_sha256(path)
    assert base_model_sha256(path) == seed0
    path.write_text(path.read_text().replace('task = "digits-mlp"', 'task = "digits-mlp"\nseed = 1'))
    assert base_model_sha256(path) != seed0


class ScriptedLink:
    """A SuperLink whose guard and run status follow a script, one entry per poll."""

    process = None
    log_path = "superlink.log"

    def __init__(self, statuses: list[dict[int, str]]):
        self.statuses = statuses
        self.polls = 0

    def guard(self, flower_run, nodes):
        assert nodes == {11, 12}  # the enrolled nodes, nothing else
        self.polls += 1
        return self.statuses[self.polls - 1]

    def run_status(self, run_id):
        return ("finished", "completed", "") if self.polls == len(self.statuses) else \
            ("running", "", "")


def test_the_operator_sees_each_enrolled_node_come_online_and_go_offline(tmp_path, monkeypatch):
    import threading

    from consortia.server import deploy

    monkeypatch.setattr(deploy, "POLL_S", 0.001)
    link = ScriptedLink([{11: "registered", 12: "registered"},
                         {11: "online", 12: "registered"},
                         {11: "online", 12: "online"},
                         {11: "offline", 12: "online"},   # site-a's SuperNode died
                         {11: "offline", 12: "online"},
                         {11: "online", 12: "online"}])   # and is back
    said = []
    result = deploy.wait_for_run(link, 7, {"site-a": 11, "site-b": 12}, threading.Event(),
                                 tmp_path, said.append, needed=2)
    assert result == ("completed", "")
    # While fewer than run.clients are online, whom the run waits for; said again only when
    # that changes.
    assert said == ["waiting: 0 of run.clients = 2 partners online; not online: site-a, site-b",
                    "site-a: online",
                    "waiting: 1 of run.clients = 2 partners online; not online: site-b",
                    "site-b: online",
                    "site-a: offline",
                    "waiting: 1 of run.clients = 2 partners online; not online: site-a",
                    "site-a: online"]


def test_a_resumed_run_says_only_the_rounds_it_runs(tmp_path, monkeypatch):
    """server start --resume said the rounds up to its checkpoint again ('round 1: ...',
    'round 2: ...') as if they had just been recorded, before the first new one."""
    import json
    import threading

    from consortia.server import deploy

    monkeypatch.setattr(deploy, "POLL_S", 0.001)
    row = {"accuracy": 0.5, "clients_trained": 2, "clients_sampled": 2}
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, **row}) + "\n" for r in (1, 2, 3)))
    said = []
    deploy.wait_for_run(ScriptedLink([{11: "online", 12: "online"}]), 7,
                        {"site-a": 11, "site-b": 12}, threading.Event(), tmp_path, said.append,
                        needed=2, after_round=2)
    assert [line for line in said if line.startswith("round")] == [
        "round 3: accuracy 0.5000, trained 2/2"]


@pytest.mark.parametrize("done, said", [
    (2, "the run stopped after round 2 of 3; continue it with: consortia server start "
        "--config server.toml --resume"),
    (3, None)])
def test_server_start_says_when_the_run_was_stopped_before_its_last_round(monkeypatch, done,
                                                                         said):
    """After `consortia runs stop`, server start said only 'final accuracy ...' (exit 0),
    as after a completed run."""
    from typer.testing import CliRunner

    from consortia.cli import app
    from consortia.server import deploy

    monkeypatch.setattr(deploy, "serve", lambda *a, **k: {
        "final_accuracy": 0.5, "rounds_completed": done, "config": {"rounds": 3}})
    result = CliRunner().invoke(app, ["server", "start", "--config", "server.toml"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "final accuracy 0.5000" in output
    assert (said in output) if said else ("stopped" not in output)


def test_a_busy_port_fails_at_start_naming_it_and_leaves_no_results(tmp_path):
    import socket

    from consortia.server.deploy import DeploymentError, serve

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    with socket.socket() as busy:  # another server already listens there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeploymentError, match=rf"server\.port {port} on 127\.0\.0\.1 is not free"):
            serve(server_toml(tmp_path, port))
    # Nothing was prepared: the same config starts once the port is free.
    assert not (tmp_path / "results").exists()


def test_a_test_set_the_server_cannot_load_fails_at_start_and_leaves_no_results(tmp_path):
    """The server evaluates on its task's test set. One it cannot load failed only in the
    ServerApp, after the SuperLink started, the results directory was made and the run was
    submitted ('the run ended failed: ServerApp failed with exception: Fashion-MNIST files
    not found in ...')."""
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port()).read_text()
    path = path.replace('task = "digits-mlp"', f'task = "fashion-mnist-cnn"\n'
                                               f'data_dir = "{tmp_path / "no-such-folder"}"')
    (tmp_path / "server.toml").write_text(path)
    with pytest.raises(DeploymentError, match=r"run.task = 'fashion-mnist-cnn' \(run.data_dir = "
                                              r"'.*no-such-folder'\): the server's test set "
                                              r"cannot be loaded: DatasetMissingError: "
                                              r"Fashion-MNIST files not found"):
        serve(tmp_path / "server.toml")
    assert not (tmp_path / "results").exists()


def test_a_key_enrolled_under_two_names_fails_at_start_and_leaves_no_results(tmp_path):
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve

    certs = init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    shutil.copy(certs / "enrolled" / "site-a.pub", certs / "enrolled" / "site-d.pub")
    with pytest.raises(DeploymentError, match="one key is enrolled under several names in "
                                              ".*: site-a, site-d"):
        serve(server_toml(tmp_path, free_port()))
    assert not (tmp_path / "results").exists()  # the same config starts once it is mended


def test_a_superlink_that_does_not_start_leaves_a_results_directory_that_starts_again(tmp_path):
    """A SuperLink that did not come up (here: start_timeout_s too short) left run.json: the
    same config was then refused ('already holds run ...; pass --resume') and so was
    --resume ('no checkpoint ... verifies'), for a run that never began."""
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve
    from consortia.server.run_dir import prepare_out_dir

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port())
    path.write_text(path.read_text().replace('out = "results"',
                                             'out = "results"\nstart_timeout_s = 0.001'))
    with pytest.raises(DeploymentError, match=r"did not answer within server.start_timeout_s "
                                              r"= 0.001 s; raise it"):
        serve(path)
    out = tmp_path / "results"
    assert (out / "superlink" / "superlink.log").exists()  # the log it names stays
    assert not (out / "run.json").exists()
    prepare_out_dir(load_server_config(path).run, out, resume=False, kind="deployment")


def test_ctrl_c_while_the_superlink_starts_says_no_round_ran(tmp_path, monkeypatch):
    """Ctrl-C during the SuperLink's start printed nothing (partner audit): now it says no
    round ran and how to start, exits 130, and leaves no run.json behind."""
    from consortia.flower_exec import free_port
    from consortia.server.deploy import serve
    from consortia.server.superlink import SuperLink

    def interrupted(self, timeout_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(SuperLink, "start", interrupted)
    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port())
    said = []
    with pytest.raises(SystemExit) as exited:
        serve(path, log=said.append)
    assert exited.value.code == 130
    assert said == [f"stopped before the run began (no round ran); start it with: "
                    f"consortia server start --config {path}"]
    assert not (tmp_path / "results" / "run.json").exists()


def test_a_results_directory_that_is_a_file_fails_naming_the_setting(tmp_path):
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    (tmp_path / "results").write_text("a file")  # was FileExistsError's traceback
    with pytest.raises(DeploymentError, match=r"results cannot be the results directory \(File "
                                              r"exists\); .*\(\[server\] out in server.toml\)"):
        serve(server_toml(tmp_path, free_port()))


def test_the_documented_certs_and_host_0000_start_a_superlink_server_start_can_reach(tmp_path):
    """operators.md's provisioning (certs init --host fl.example.org --host 203.0.113.7)
    with its server.toml (host = "0.0.0.0") never started: server start dials its own
    Control API at 127.0.0.1, which the certificate did not name (TLS: 'IP address
    mismatch'), and it ended in 'did not answer within start_timeout_s'."""
    from consortia.flower_exec import free_port
    from consortia.server.superlink import SuperLink

    certs = init_consortium(tmp_path / "consortium", ["fl.example.org", "203.0.113.7"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port())
    path.write_text(path.read_text().replace("[server]", '[server]\nhost = "0.0.0.0"'))
    cfg = load_server_config(path)
    cfg.check_files()
    link = SuperLink(certs, "0.0.0.0", cfg.server.port, tmp_path / "superlink")
    try:
        link.start(30)
        assert link._control_reachable()
    finally:
        link.stop()


@pytest.mark.parametrize("host, dialled", [("0.0.0.0", "127.0.0.1"), ("::", "::1"),
                                           ("127.0.0.1", "127.0.0.1")])
def test_a_server_certificate_without_the_address_server_start_dials_fails_at_start(
        tmp_path, monkeypatch, host, dialled):
    """A certificate issued before certs named the loopback addresses: said at start, not
    after start_timeout_s as a timeout."""
    import consortia.privacy.certs as certs_module

    monkeypatch.setattr(certs_module, "LOOPBACK_HOSTS", [])
    init_consortium(tmp_path / "consortium", ["fl.example.org"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path)
    path.write_text(path.read_text().replace("[server]", f'[server]\nhost = "{host}"'))
    with pytest.raises(ConfigError, match=rf"server.pem is not valid for {dialled}, where server "
                                          rf"start dials its own SuperLink \(server.host = "
                                          rf"'{host}'\): leaf certificate has no matching "
                                          rf"subjectAltName; .*consortia certs server --dir"):
        load_server_config(path).check_files()


NOW = dt.datetime.now(dt.UTC)


@pytest.mark.parametrize("name, not_before, not_after, message", [
    ("server.pem", NOW - dt.timedelta(days=900), NOW - dt.timedelta(days=75),
     r"server.pem expired on {date} UTC, and TLS refuses an expired certificate; renew it "
     r"from the CA \(partners need nothing new\): `consortia certs server --dir"),
    ("ca.pem", NOW - dt.timedelta(days=3660), NOW - dt.timedelta(days=10),
     r"ca.pem expired on {date} UTC, .*a new CA means a new consortium: `consortia certs init"),
    ("server.pem", NOW + dt.timedelta(days=2), NOW + dt.timedelta(days=800),
     r"server.pem is valid only from {start} UTC, after this machine's clock .*check the clock"),
])
def test_an_expired_or_not_yet_valid_certificate_fails_at_start_saying_when(
        tmp_path, name, not_before, not_after, message):
    """An expired server.pem started: every partner's TLS handshake then failed, and the
    operator saw only partners that never came."""
    certs = init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    cfg = load_server_config(server_toml(tmp_path))
    cfg.check_files()
    resign(certs, name, not_before, not_after)
    with pytest.raises(ConfigError, match=message.format(
            date=f"{not_after:%Y-%m-%d %H:%M}", start=f"{not_before:%Y-%m-%d %H:%M}")):
        cfg.check_files()


def test_a_run_the_server_was_stopped_under_is_recorded_stopped_not_running(tmp_path):
    from consortia.server.store import RunStore, default_store_url, mark_interrupted

    url = default_store_url(tmp_path)
    store = RunStore(url)
    try:
        store.start_run("r1", task="digits-mlp", rounds_total=5, config={})
        store.start_run("r2", task="digits-mlp", rounds_total=5, config={})
        store.finish_run("r2", "completed")
        resume = "consortia server start --config s.toml --resume"
        mark_interrupted(url, "r1", resume)  # SIGTERM: the ServerApp's process had no time to say
        mark_interrupted(url, "r2", resume)  # a run that ended keeps how it ended
        mark_interrupted(url, "r3", resume)  # stopped before the ServerApp registered the run
        assert store.get_run("r1")["status"] == "stopped"
        assert "--resume" in store.audit_log("r1")[0]["detail"]
        assert store.get_run("r2")["status"] == "completed"
        store.start_run("r1", task="digits-mlp", rounds_total=5, config={})  # --resume
        assert store.get_run("r1")["status"] == "running"
    finally:
        store.close()


@pytest.mark.parametrize("host", ["203.0.113.7", "no-such-host.invalid"])
def test_a_host_this_machine_cannot_listen_on_fails_naming_it(tmp_path, host):
    from consortia.server.superlink import DeploymentError, SuperLink

    link = SuperLink(tmp_path, host, 9093, tmp_path / "superlink")
    with pytest.raises(DeploymentError, match=rf"server\.host '{host}': cannot listen there"):
        link.check_port_free()


def test_server_start_on_a_host_not_this_machines_names_the_host_not_the_certificate(tmp_path):
    """server.host = 10.9.9.9 (not this machine) said server.pem is not valid for it, and
    an operator who issued one for it was then told the host cannot be listened on."""
    from consortia.server.deploy import DeploymentError, serve

    init_consortium(tmp_path / "consortium", ["fl.example.org"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path)
    path.write_text(path.read_text().replace("[server]", '[server]\nhost = "203.0.113.7"'))
    with pytest.raises(DeploymentError, match=r"server\.host '203\.0\.113\.7': cannot listen"):
        serve(path)


@pytest.mark.parametrize("checkpointed, started", [(3, False), (2, True)])
def test_resume_leaves_a_completed_run_alone(tmp_path, monkeypatch, checkpointed, started):
    """A finished run (every round checkpointed, its summary written) has nothing to
    resume: no SuperLink, no new rounds (a store without the run is given it, once). A
    run stopped after round 2 of 3 resumes."""
    import json

    import numpy as np

    from consortia.flower_exec import free_port
    from consortia.server import deploy
    from consortia.server.checkpoint import CheckpointStore
    from consortia.server.run_dir import prepare_out_dir
    from consortia.server.store import RunStore, default_store_url

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port(), "rounds = 3\n")
    cfg = load_server_config(path)
    prepare_out_dir(cfg.run, cfg.server.out, resume=False)
    checkpoints = CheckpointStore(cfg.server.out / "checkpoints")
    for r in range(checkpointed + 1):
        checkpoints.save(r, {"w": np.zeros(2, np.float32)}, {})
    summary = {"final_accuracy": 0.5, "rounds_completed": checkpointed}
    (cfg.server.out / "summary.json").write_text(json.dumps(summary))

    class Started(Exception):
        pass

    def start(self, timeout):
        raise Started

    monkeypatch.setattr(deploy.SuperLink, "start", start)
    said = []
    if started:
        with pytest.raises(Started):
            deploy.serve(path, resume=True, log=said.append)
    else:
        assert deploy.serve(path, resume=True, log=said.append) == summary
        run_id = json.loads((cfg.server.out / 'run.json').read_text())['run_id']
        done = (f"run {run_id} already completed all 3 rounds: nothing to run (results in "
                f"{cfg.server.out})")
        # The run's store had not the run (here: none was made; a damaged one moved aside):
        # it is recorded there from the results directory, once.
        assert said == [done, f"recorded run {run_id} again in the run store "
                              f"{default_store_url(cfg.server.out)}"]
        store = RunStore(cfg.server.out, create=False)
        run = store.get_run(run_id)
        assert (run["kind"], run["status"], run["rounds_total"]) == ("deployment", "completed", 3)
        assert [c["round"] for c in store.checkpoints(run_id)] == [0, 1, 2, 3]
        store.close()
        said.clear()
        deploy.serve(path, resume=True, log=said.append)
        assert said == [done]
    assert not (cfg.server.out / "deployment.json").exists()


def test_a_store_that_cannot_be_opened_is_a_deployment_error_not_a_traceback(tmp_path):
    """`consortia server start` with a store.url that cannot be opened (a file that is
    not a database: 'StoreError: cannot open store ...' after a 258-line traceback), or a
    damaged store.db in [server] out (not checked at all: it failed in the ServerApp's
    process once the SuperLink was up), fails at start in one line naming the file."""
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x13" * 5000)
    path = server_toml(tmp_path, free_port(), f'\n[run.store]\nurl = "{garbage}"\n')
    with pytest.raises(DeploymentError, match=f"not a database; the store file {garbage} is "
                                              "damaged: move it aside"):
        serve(path)
    path = server_toml(tmp_path, free_port())
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "store.db").write_bytes(garbage.read_bytes())
    with pytest.raises(DeploymentError, match="consortia server start --config FILE --resume"):
        serve(path, resume=True)


def test_a_results_directory_in_use_names_the_setting_each_command_has(tmp_path):
    """`server start` has no --out: its results directory is [server] out in server.toml."""
    from consortia.flower_exec import free_port
    from consortia.server.deploy import DeploymentError, serve
    from consortia.server.run_dir import ResultsDirError, prepare_out_dir

    init_consortium(tmp_path / "consortium", ["127.0.0.1"])
    enroll_run_clients(tmp_path)
    path = server_toml(tmp_path, free_port())
    cfg = load_server_config(path)
    prepare_out_dir(cfg.run, cfg.server.out, resume=False)  # a run started there before
    with pytest.raises(DeploymentError) as err:
        serve(path)
    assert str(err.value).endswith("pass --resume to continue it, or choose another results "
                                   "directory ([server] out in server.toml)")
    with pytest.raises(ResultsDirError, match=r"another results directory \(--out\)$"):
        prepare_out_dir(cfg.run, cfg.server.out, resume=False)  # as `sim run` calls it
