"""The console's API and page over a run store (FastAPI TestClient): every route, its token."""

import json
import os
import stat

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from consortia.cli import app as cli
from consortia.server.checkpoint import CheckpointStore
from consortia.server.console import ConsoleToken, TokenError, create_app
from consortia.server.console.app import STATIC_TYPES
from consortia.server.store import RunStore

RUN = "a1b2c3d4e5f6"
ROUTES = ["/api/runs", f"/api/runs/{RUN}", f"/api/runs/{RUN}/rounds", f"/api/runs/{RUN}/clients",
          f"/api/runs/{RUN}/participation", f"/api/runs/{RUN}/checkpoints",
          f"/api/runs/{RUN}/checkpoints/1/weights", f"/api/runs/{RUN}/audit"]
RUN_ROUTES = [r for r in ROUTES if r != "/api/runs"]


@pytest.fixture
def world(tmp_path):
    """A store with one finished two-round run (checkpoints on disk) and one running run."""
    store = RunStore(tmp_path / "store.db")
    ckpts = CheckpointStore(tmp_path / "checkpoints")
    store.start_run(RUN, task="digits-mlp", rounds_total=2, config={"rounds": 2}, out_dir=tmp_path)
    for r in (0, 1, 2):
        c = ckpts.save(r, {"w": np.full(3, r, np.float32)}, {"accuracy": 0.3 * r})
        store.record_checkpoint(RUN, r, c.sha256, c.parent_sha256, c.weights_path)
        if r:
            store.record_round(RUN, {"round": r, "accuracy": 0.3 * r, "loss": 2.0 / r,
                                     "clients_sampled": 3, "clients_trained": 2,
                                     "clients_rejected": 1, "checkpoint_sha256": c.sha256,
                                     "secagg_status": "ok", "secagg_dropped": 0},
                               [{"round": r, "client_id": str(i), "node_id": i + 2**63,
                                 "status": "trained" if i < 2 else "rejected",
                                 "reason": "" if i < 2 else "<script>alert(1)</script>",
                                 "epsilon": 0.5 * r, "epsilon_budget": 3.0} for i in range(3)])
    store.finish_run(RUN, "completed")
    store.start_run("running0", task="digits-mlp", rounds_total=5, config={})
    token = ConsoleToken(tmp_path / "token")
    secret = token.ensure()
    client = TestClient(create_app(store, token))
    yield client, {"Authorization": f"Bearer {secret}"}, store, token, secret, tmp_path
    store.close()


def test_token_file_holds_only_a_hash_with_mode_0600(world):
    *_, token, secret, _ = world
    assert stat.S_IMODE(os.stat(token.path).st_mode) == 0o600
    assert secret not in token.path.read_text()
    assert token.ensure() is None  # made once; later starts do not print it again


@pytest.mark.parametrize("path", ROUTES + ["/", "/static/console.js"])
def test_every_route_refuses_a_missing_or_wrong_token(world, path):
    client, *_ = world
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(f"/api/runs/{RUN}/stop").status_code == 401


@pytest.mark.parametrize("path", RUN_ROUTES + [f"/api/runs/{RUN}/checkpoints/9/weights"])
def test_unknown_run_or_checkpoint_is_404(world, path):
    client, auth, *_ = world
    path = path.replace(RUN, "nosuchrun") if "/9/" not in path else path
    response = client.get(path, headers=auth)
    assert response.status_code == 404
    assert "nosuchrun" in response.json()["detail"] or "round 9" in response.json()["detail"]
    assert client.post("/api/runs/nosuchrun/stop", headers=auth).status_code == 404


@pytest.mark.parametrize("path", [f"/api/runs/{RUN}/participation?round={2**63}",
                                  f"/api/runs/{RUN}/checkpoints/{2**63}/weights",
                                  f"/api/runs/{RUN}/participation?round=-1",
                                  f"/api/runs/{RUN}/checkpoints/-1/weights"])
def test_a_round_out_of_range_is_422_naming_the_bound_not_500(world, path):
    """A round past SQLite's INTEGER failed in the driver (OverflowError, a 500)."""
    client, auth, *_ = world
    response = client.get(path, headers=auth)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["input"] in (str(2**63), "-1") and set(error["ctx"]) & {"le", "ge"}


@pytest.mark.parametrize("path", RUN_ROUTES)
def test_every_run_route_takes_a_unique_prefix_of_the_run_id(world, path):
    """As the CLI does: `runs show a1b2` and /api/runs/a1b2 are the same run."""
    client, auth, *_ = world
    whole = client.get(path, headers=auth)
    short = client.get(path.replace(RUN, RUN[:4]), headers=auth)
    assert short.status_code == whole.status_code == 200
    assert short.content == whole.content and RUN in short.headers.get(
        "content-disposition", RUN)  # the download is named by the whole id


@pytest.mark.parametrize("path", RUN_ROUTES)
def test_an_ambiguous_prefix_is_409_naming_the_runs_it_matches(world, path):
    client, auth, store, *_ = world
    store.start_run("a1b2ffff", task="digits-mlp", rounds_total=1, config={})
    response = client.get(path.replace(RUN, "a1b2"), headers=auth)
    assert response.status_code == 409
    assert response.json() == {"detail": f"'a1b2' matches 2 runs: {RUN}, a1b2ffff; give more "
                                         "of the run id", "matches": [RUN, "a1b2ffff"]}
    assert client.get(path.replace(RUN, "a1b2"), headers={}).status_code == 401  # no ids told
    # A whole id is that run, even when it starts another's.
    store.start_run(RUN + "0", task="digits-mlp", rounds_total=1, config={})
    assert client.get(path, headers=auth).status_code == 200


def test_stop_takes_a_unique_prefix_and_stops_nothing_on_an_ambiguous_one(world):
    client, auth, store, *_ = world
    response = client.post("/api/runs/runn/stop", headers=auth)
    assert response.status_code == 202 and response.json()["run_id"] == "running0"
    assert store.stop_requested("running0")
    store.start_run("running1", task="digits-mlp", rounds_total=1, config={})
    ambiguous = client.post("/api/runs/runn/stop", headers=auth)
    assert ambiguous.status_code == 409 and ambiguous.json()["matches"] == ["running0", "running1"]
    assert not store.stop_requested("running1")
    unknown = client.post("/api/runs/zz/stop", headers=auth)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no run 'zz' in the store"


def test_runs_list_and_run(world):
    client, auth, *_ = world
    runs = client.get("/api/runs", headers=auth).json()
    assert {r["run_id"]: r["status"] for r in runs} == {RUN: "completed", "running0": "running"}
    run = client.get(f"/api/runs/{RUN}", headers=auth).json()
    assert run["rounds_completed"] == 2 and run["last_round"]["accuracy"] == 0.6
    assert run["config"] == {"rounds": 2}


def test_rounds_clients_participation_checkpoints_audit(world):
    client, auth, *_ = world
    rounds = client.get(f"/api/runs/{RUN}/rounds", headers=auth).json()
    assert [(r["round"], r["accuracy"], r["secagg_status"]) for r in rounds] == \
        [(1, 0.3, "ok"), (2, 0.6, "ok")]
    clients = client.get(f"/api/runs/{RUN}/clients", headers=auth).json()
    assert [(c["client_id"], c["rounds_joined"], c["epsilon"]) for c in clients] == \
        [("0", 2, 1.0), ("1", 2, 1.0), ("2", 0, 1.0)]
    part = client.get(f"/api/runs/{RUN}/participation?round=2", headers=auth).json()
    assert len(part) == 3 and part[0]["node_id"] == 2**63
    ckpts = client.get(f"/api/runs/{RUN}/checkpoints", headers=auth).json()
    assert [c["round"] for c in ckpts] == [0, 1, 2]
    assert ckpts[0]["parent_sha256"] is None
    assert [c["parent_sha256"] for c in ckpts[1:]] == [c["sha256"] for c in ckpts[:-1]]
    audit = client.get(f"/api/runs/{RUN}/audit", headers=auth).json()
    assert audit[0]["event"] == "run-completed" and audit[-1]["event"] == "run-started"


def test_checkpoint_download_is_the_weights_with_the_recorded_hash(world):
    import hashlib

    client, auth, store, *_ = world
    response = client.get(f"/api/runs/{RUN}/checkpoints/1/weights", headers=auth)
    assert response.status_code == 200
    assert "round-00001.safetensors" in response.headers["content-disposition"]
    assert hashlib.sha256(response.content).hexdigest() == store.checkpoints(RUN)[1]["sha256"]


def test_a_weights_file_changed_since_its_checkpoint_is_not_served_as_it(world):
    """The download served whatever bytes the weights file held: a file changed after the
    run wrote it (64 bytes zeroed in a 2-round run's round-00002.safetensors) came as the
    round's weights, with SHA-256 7b58e8604755..., beside the page's 20b80328f2ed...."""
    client, auth, store, *_, tmp_path = world
    path = tmp_path / "checkpoints" / "round-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00" * 4
    path.write_bytes(bytes(data))
    response = client.get(f"/api/runs/{RUN}/checkpoints/2/weights", headers=auth)
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert str(path) in detail and store.checkpoints(RUN)[2]["sha256"] in detail
    assert "changed after the run wrote it" in detail
    assert client.get(f"/api/runs/{RUN}/checkpoints/1/weights", headers=auth).status_code == 200


def test_stop_is_recorded_and_refused_for_a_finished_run(world):
    client, auth, store, *_ = world
    response = client.post("/api/runs/running0/stop", headers=auth)
    assert response.status_code == 202 and response.json()["stop_requested_by"] == "console"
    assert store.stop_requested("running0")
    assert store.audit_log("running0")[0]["event"] == "stop-requested"
    finished = client.post(f"/api/runs/{RUN}/stop", headers=auth)
    assert finished.status_code == 409 and "completed" in finished.json()["detail"]


def test_page_trades_the_printed_token_for_a_cookie(world):
    client, _, _, _, secret, _ = world
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    first = client.get(f"/?token={secret}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"
    assert "httponly" in first.headers["set-cookie"].lower()
    assert "samesite=strict" in first.headers["set-cookie"].lower()
    page = client.get("/")  # the client keeps the cookie
    assert page.status_code == 200 and 'id="accuracy-chart"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in STATIC_TYPES:
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/api/runs").status_code == 200
    # A write through the cookie needs the header a cross-site form cannot send.
    assert client.post("/api/runs/running0/stop").status_code == 403
    assert client.post("/api/runs/running0/stop",
                       headers={"X-Consortia-Request": "1"}).status_code == 202


def test_rotating_the_token_locks_out_the_old_one_at_once(world):
    client, auth, _, token, *_ = world
    assert client.get("/api/runs", headers=auth).status_code == 200
    new = ConsoleToken(token.path).rotate()
    assert client.get("/api/runs", headers=auth).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_no_route_exposes_keys_or_updates(world):
    client, auth, *_ = world
    assert client.get("/docs", headers=auth).status_code == 404
    assert client.get("/openapi.json", headers=auth).status_code == 404
    text = json.dumps([client.get(p, headers=auth).json() for p in ROUTES if "weights" not in p])
    for word in ("private_key", "secret", "shares", "masked", "arrays", "seed_key"):
        assert word not in text


def test_cli_runs_ls_show_stop_json(world):
    _, _, store, _, _, tmp_path = world
    runner = CliRunner()
    ls = runner.invoke(cli, ["runs", "ls", "--store", str(tmp_path), "--json"])
    assert ls.exit_code == 0, ls.output
    assert {r["run_id"] for r in json.loads(ls.stdout)} == {RUN, "running0"}
    show = runner.invoke(cli, ["runs", "show", RUN[:4], "--store", str(tmp_path), "--json"])
    assert show.exit_code == 0, show.output
    shown = json.loads(show.stdout)
    assert shown["run"]["run_id"] == RUN and len(shown["rounds"]) == 2 and len(shown["clients"]) == 3
    assert runner.invoke(cli, ["runs", "show", RUN, "--store", str(tmp_path)]).exit_code == 0
    stop = runner.invoke(cli, ["runs", "stop", "running0", "--store", str(tmp_path), "--json"])
    assert stop.exit_code == 0 and json.loads(stop.stdout)["stop_requested_by"].startswith("cli:")
    again = runner.invoke(cli, ["runs", "stop", RUN, "--store", str(tmp_path)])
    assert again.exit_code == 1 and "not running" in again.output
    missing = runner.invoke(cli, ["runs", "show", "zzz", "--store", str(tmp_path)])
    assert missing.exit_code == 1 and "'zzz'" in missing.output
    nostore = runner.invoke(cli, ["runs", "ls", "--store", str(tmp_path / "nope.db")])
    assert nostore.exit_code == 2 and "nope.db" in nostore.output


def test_cli_reads_a_store_without_writing_to_the_wrong_file(tmp_path):
    # An operator who points --store at the wrong file is told so, and the file is left as
    # it was: not given the store's tables, not even a database header.
    runner = CliRunner()
    empty, text = tmp_path / "empty.db", tmp_path / "notes.db"
    empty.touch()
    text.write_text("not a database")
    for path, why in ((empty, "not a consortia run store"), (text, "not a database")):
        before = path.read_bytes()
        for args in (["runs", "ls"], ["runs", "show", "x"]):
            result = runner.invoke(cli, [*args, "--store", str(path)])
            flat = "".join(result.output.split())  # the terminal wraps long lines
            assert result.exit_code == 2, result.output
            assert "".join(why.split()) in flat and str(path) in flat and "Traceback" not in flat
        assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == sorted([empty, text])


def test_cli_says_where_a_run_store_will_be_before_any_run_made_it(tmp_path):
    """Pointed at a results directory before its run started, for a simulation or a
    deployment: what makes the store, and nothing created in its place."""
    result = CliRunner().invoke(cli, ["console", "--store", str(tmp_path / "results")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no run store at {tmp_path / 'results'}" in flat
    assert "sim run --out DIR; server start: [server] out in server.toml" in flat
    assert list(tmp_path.iterdir()) == []


def test_cli_console_token_rotates_and_prints_once(tmp_path):
    runner = CliRunner()
    path = tmp_path / "tok"
    first = runner.invoke(cli, ["console", "token", "--token-file", str(path)])
    assert first.exit_code == 0
    token = first.stdout.strip().splitlines()[-1]
    assert ConsoleToken(path).verify(token)
    second = runner.invoke(cli, ["console", "token", "--token-file", str(path)])
    assert not ConsoleToken(path).verify(token)
    assert ConsoleToken(path).verify(second.stdout.strip().splitlines()[-1])


def test_cli_runs_show_prints_store_text_as_it_is_not_as_markup(tmp_path):
    """A reason comes from the partner (or an exception's text): rich read it as markup, so
    '[/policy]' failed `runs show` with a MarkupError traceback and '[bold]' was swallowed."""
    store = RunStore(tmp_path / "store.db")
    store.start_run("run1", task="digits-mlp", rounds_total=2, config={})
    reasons = {"0": "outside [/policy] limits", "1": "[bold]red[/bold] and [code: 2004]"}
    store.record_round("run1", {"round": 1, "clients_sampled": 2},
                       [{"round": 1, "client_id": c, "status": "refused-policy", "reason": why}
                        for c, why in reasons.items()])
    store.close()
    result = CliRunner().invoke(cli, ["runs", "show", "run1", "--store", str(tmp_path)],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for why in reasons.values():
        assert result.output.count(why) == 2  # the client table and the audit log


@pytest.fixture
def served(monkeypatch):
    """`consortia console`'s calls to serve, recorded instead of serving."""
    import consortia.server.console as console_pkg

    calls = []
    monkeypatch.setattr(console_pkg, "serve", lambda *args, **kw: calls.append((args, kw)))
    return calls


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_cli_console_refuses_a_port_outside_1_to_65535(world, served, port):
    """--port 70000 served on 4464 (70000 mod 65536) while it printed :70000; 0, a random one."""
    *_, tmp_path = world
    result = CliRunner().invoke(cli, ["console", "--store", str(tmp_path), "--port", port,
                                      "--token-file", str(tmp_path / "token")])
    assert result.exit_code == 2 and served == []
    assert "1<=x<=65535" in result.output and port in result.output


def test_cli_console_says_a_port_in_use_or_a_host_not_here_before_it_prints_a_url(world, served):
    import socket

    *_, tmp_path = world
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(cli, ["console", "--store", str(tmp_path), "--port", str(port),
                                        "--token-file", str(tmp_path / "token")])
    flat = " ".join(busy.output.split())
    assert busy.exit_code == 2 and served == [], busy.output
    assert f"cannot serve the console on 127.0.0.1:{port}" in flat and "another --port" in flat
    assert "http://" not in flat  # no URL for a console that is not there
    elsewhere = CliRunner().invoke(cli, ["console", "--store", str(tmp_path), "--host",
                                         "256.1.1.1", "--token-file", str(tmp_path / "token")])
    assert elsewhere.exit_code == 2 and served == []
    assert "256.1.1.1:8080" in " ".join(elsewhere.output.split()) and "--host" in elsewhere.output


@pytest.mark.parametrize("content", ['{"sha256": 5}', '{"sha256": null}', '{"sha256": "abc"}'])
def test_a_token_file_without_a_sha256_digest_is_refused_at_start_not_a_500(
        tmp_path, served, monkeypatch, content):
    """Such a file passed the start check, then every request was a 500 (TypeError in
    compare_digest) or no token could ever match."""
    import consortia.server.console.app as console_app

    monkeypatch.setattr(console_app, "listen", lambda host, port: None)
    path = tmp_path / "tok"
    path.write_text(content)
    store = RunStore(tmp_path / "store.db")
    result = CliRunner().invoke(cli, ["console", "--store", str(tmp_path), "--token-file",
                                      str(path)])
    assert result.exit_code == 2 and served == []
    assert "not a consortia token file" in " ".join(result.output.split())
    client = TestClient(create_app(store, ConsoleToken(path)), raise_server_exceptions=False)
    assert client.get("/api/runs", headers={"Authorization": "Bearer x"}).status_code == 401
    with pytest.raises(TokenError, match="not a consortia token file"):
        ConsoleToken(path).ensure()
    store.close()


def test_a_token_file_path_that_cannot_be_written_is_named_not_a_traceback(
        tmp_path, served, monkeypatch):
    import consortia.server.console.app as console_app

    monkeypatch.setattr(console_app, "listen", lambda host, port: None)
    (tmp_path / "a-file").write_text("")
    RunStore(tmp_path / "s.db").close()
    for path in (tmp_path, tmp_path / "a-file" / "tok"):  # a folder; under a file
        for args in (["console", "token"], ["console", "--store", str(tmp_path / "s.db")]):
            result = CliRunner().invoke(cli, [*args, "--token-file", str(path)])
            flat = " ".join(result.output.split())
            assert result.exit_code == 2, result.output
            assert f"cannot write the console token file {path}" in flat
            assert isinstance(result.exception, SystemExit) and served == []


def test_cli_json_is_strict_json_when_a_run_diverged(tmp_path):
    """A diverging run's loss is Infinity or NaN: `runs show --json` wrote them bare (no JSON
    parser but Python's reads them); the API gives null, and so does the CLI now."""
    store = RunStore(tmp_path / "store.db")
    store.start_run("run1", task="digits-mlp", rounds_total=2, config={})
    store.record_round("run1", {"round": 1, "loss": float("inf"), "accuracy": 0.3},
                       [{"round": 1, "client_id": "0", "status": "trained",
                         "train_loss": float("nan"), "epsilon": 0.5}])
    store.close()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    show = CliRunner().invoke(cli, ["runs", "show", "run1", "--store", str(tmp_path), "--json"])
    assert show.exit_code == 0, show.output
    shown = strict(show.stdout)
    assert shown["rounds"][0]["loss"] is None and shown["rounds"][0]["accuracy"] == 0.3
    assert shown["clients"][0]["epsilon"] == 0.5
    ls = CliRunner().invoke(cli, ["runs", "ls", "--store", str(tmp_path), "--json"])
    assert strict(ls.stdout)[0]["run_id"] == "run1"


def test_cli_opens_a_postgresql_store_with_its_password_not_stars(monkeypatch):
    """`runs ls --store postgresql://u:PW@host/db` opened RunStore(str(url)), and SQLAlchemy's
    str() of a URL masks the password: the CLI would have logged in with '***'."""
    import consortia.server.store as store_pkg

    opened = []

    class Recorder:
        def __init__(self, url, create=True):
            opened.append(url)

        def list_runs(self):
            return []

    monkeypatch.setattr(store_pkg, "RunStore", Recorder)
    url = "postgresql+psycopg://consortia:s3cret@db.example.org/consortia"
    result = CliRunner().invoke(cli, ["runs", "ls", "--store", url, "--json"])
    assert result.exit_code == 0, result.output
    assert opened == [url]


def test_cli_says_a_sqlite_url_names_a_folder_not_that_no_run_made_it(world):
    """--store sqlite:///RESULTS (the folder, as a URL) said 'no run store at RESULTS yet:
    ... start the run', of a finished run's results directory."""
    *_, tmp_path = world
    result = CliRunner().invoke(cli, ["runs", "ls", "--store", f"sqlite:///{tmp_path}"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"names the folder {tmp_path}, not a SQLite file" in flat and "yet" not in flat


def test_cli_console_token_rotates_the_file_given_before_the_subcommand(tmp_path, monkeypatch):
    """`console --token-file X token` (X as the console was started with) rotated the default
    file instead, and the running console's old token kept working."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CONSORTIA_CONSOLE_TOKEN_FILE", raising=False)
    path = tmp_path / "tok"
    old = ConsoleToken(path).rotate()
    result = CliRunner().invoke(cli, ["console", "--token-file", str(path), "token"])
    assert result.exit_code == 0, result.output
    new = result.stdout.strip().splitlines()[-1]
    assert ConsoleToken(path).verify(new) and not ConsoleToken(path).verify(old)
    assert not (tmp_path / "xdg").exists()
    # Given after the subcommand, or in both places, the subcommand's own wins.
    other = tmp_path / "other"
    result = CliRunner().invoke(cli, ["console", "--token-file", str(path), "token",
                                      "--token-file", str(other)])
    assert ConsoleToken(other).verify(result.stdout.strip().splitlines()[-1])
    assert ConsoleToken(path).verify(new)


def test_a_store_removed_under_a_running_console_is_503_and_not_made_anew(tmp_path):
    """The console's new connections opened the store's path read-write-create: a store.db
    removed while it ran was made anew, empty, in the results directory, and each request
    on such a connection was a bare 500 ('no such table')."""
    RunStore(tmp_path / "store.db").close()
    store = RunStore(tmp_path, create=False)  # as `consortia console --store DIR` opens it
    token = ConsoleToken(tmp_path / "token")
    secret = token.rotate()
    client = TestClient(create_app(store, token), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/runs", headers=auth).status_code == 200
    for name in ("store.db", "store.db-wal", "store.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    store.close()  # the pool's next connection opens the path again
    response = client.get("/api/runs", headers=auth)
    assert response.status_code == 503
    assert str(tmp_path / "store.db") in response.json()["detail"]
    assert "cannot be read" in response.json()["detail"]
    assert not (tmp_path / "store.db").exists()


def test_a_stop_the_store_cannot_take_is_named_not_a_traceback_or_500(tmp_path, monkeypatch):
    """`runs stop` on a store it could not write (a read-only file: chattr +i store.db gave
    'attempt to write a readonly database'; here, a write lock held past the busy timeout)
    ended in an OperationalError traceback, and the console's stop said 'cannot be read'."""
    import sqlite3

    import consortia.server.store.store as store_module

    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    RunStore(tmp_path / "store.db").start_run("live1", task="digits-mlp", rounds_total=5,
                                              config={})
    token = ConsoleToken(tmp_path / "token")
    secret = token.rotate()
    client = TestClient(create_app(RunStore(tmp_path, create=False), token),
                        raise_server_exceptions=False)
    lock = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        result = CliRunner().invoke(cli, ["runs", "stop", "live1", "--store", str(tmp_path)])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "cannot record the stop request" in flat and "database is locked" in flat
        response = client.post("/api/runs/live1/stop",
                               headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 503
        assert "cannot be written: database is locked" in response.json()["detail"]
    finally:
        lock.rollback()
        lock.close()


def test_cli_names_the_run_stores_inside_a_sweeps_results_directory(tmp_path):
    """--store SWEEP_OUT (each cell a results directory with its store.db) said 'no run store
    at SWEEP_OUT/store.db yet: ... start the run', of a sweep whose cells had all run."""
    for cell in ("seed=0", "seed=1"):
        (tmp_path / cell).mkdir()
        RunStore(tmp_path / cell / "store.db").close()
    result = CliRunner().invoke(cli, ["runs", "ls", "--store", str(tmp_path)])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "yet" not in flat
    assert "2 of its folders do" in flat
    assert str(tmp_path / "seed=0") in flat and str(tmp_path / "seed=1") in flat


def test_a_store_damaged_past_its_schema_is_one_line_saying_what_to_do(tmp_path):
    """A store.db whose first page reads but whose tables do not (a disk error, a partial
    copy) opens; `runs show` then ended in a 300-line traceback ('database disk image is
    malformed'), and the console's 503 said only that. Both now name the file and the
    way out: move it aside, then --resume records each run in a new store."""
    path = tmp_path / "store.db"
    store = RunStore(path)
    store.start_run("run1", task="digits-mlp", rounds_total=2, config={})
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))  # every page but the schema's
    runner = CliRunner()
    for args in (["runs", "ls"], ["runs", "show", "run1"], ["runs", "stop", "run1"]):
        result = runner.invoke(cli, [*args, "--store", str(tmp_path)])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in flat and "malformed" in flat
        assert f"mv {path} {path}.damaged" in flat and "--resume" in flat
    token = ConsoleToken(tmp_path / "token")
    secret = token.rotate()
    client = TestClient(create_app(RunStore(tmp_path, create=False), token),
                        raise_server_exceptions=False)
    response = client.get("/api/runs", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 503
    assert f"mv {path} {path}.damaged" in response.json()["detail"]


def test_a_results_directory_whose_run_records_elsewhere_names_that_store(tmp_path):
    """A run started with store.url records there, not in DIR/store.db; `runs ls --store
    DIR` (and `console`) said 'no run store at DIR/store.db yet: ... start the run' of a
    run that had finished. They now name the store the run's run.json sets."""
    from consortia.config import config_to_dict, load_config

    shared = tmp_path / "shared.db"
    RunStore(shared).close()
    for name, url in (("a", str(shared)),
                      ("b", "postgresql://ops:s3cret@db.example.org/consortia"),
                      ("c", "runs/shared.db")):
        out = tmp_path / name
        out.mkdir()
        cfg = config_to_dict(load_config(None, [f"store.url={url}"]))
        (out / "run.json").write_text(json.dumps({"run_id": f"run{name}", "config": cfg}))
        for args in (["runs", "ls"], ["console"]):
            result = CliRunner().invoke(cli, [*args, "--store", str(out)])
            flat = " ".join(result.output.split())
            assert result.exit_code == 2, result.output
            assert f"holds run run{name}, which records in the store its store.url names" in flat
            assert "yet" not in flat and "s3cret" not in flat
        assert not (out / "store.db").exists()
    flat_a = " ".join(CliRunner().invoke(cli, ["runs", "ls", "--store", str(tmp_path / "a")])
                      .output.split())
    assert f"pass --store {shared}" in flat_a
    flat_b = " ".join(CliRunner().invoke(cli, ["runs", "ls", "--store", str(tmp_path / "b")])
                      .output.split())
    assert "pass --store 'postgresql://ops:***@db.example.org/consortia'" in flat_b
    assert "relative to the folder the run was started in" in flat
