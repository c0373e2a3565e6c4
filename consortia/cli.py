"""The `consortia` command."""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consortia.config import ConfigError, config_to_dict, load_config
from consortia.deploy_cli import certs_app, client_app, server_app
from consortia.privacy.display import epsilon_text
from consortia.terminal import console, fail, say
from consortia.version import __version__

# Typer frames a usage error (a missing option, a bad value) in a panel titled "Error";
# every error of ours says "error:" (terminal.fail), so the panel says it the same way.
typer.rich_utils.ERRORS_PANEL_TITLE = "error"

app = typer.Typer(help="consortia: federated learning with client-enforced differential privacy.",
                  no_args_is_help=True, add_completion=False)
sim_app = typer.Typer(help="Simulated federations (researchers).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(bench_app, name="bench")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.add_typer(client_app, name="client")

SetOption = typer.Option(None, "--set", help="Override a config key: key=value (dotted for sections).")


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        raise fail(err) from None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def resume_command(config: Path, out: Path, overrides: list[str] | None) -> str:
    """The command that continues an interrupted `sim run`: the same config and --set
    values (a resumed run must match the stored one), plus --resume; quoted for a shell."""
    sets = [arg for value in overrides or [] for arg in ("--set", value)]
    return shlex.join(["consortia", "sim", "run", str(config), "--out", str(out), *sets,
                       "--resume"])


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


@sim_app.command("config")
def sim_config(config: Path | None = typer.Argument(None), overrides: list[str] | None = SetOption) -> None:
    """Validate a config and print it resolved (defaults filled in) as JSON."""
    typer.echo(json.dumps(config_to_dict(_load(config, overrides)), indent=2))


def record_stopped(cfg, out: Path, resume_with: str) -> None:
    """An interrupted run is recorded as stopped in its store, with how to continue it."""
    from consortia.server.run_dir import RUN_FILE
    from consortia.server.store import StoreError, default_store_url, mark_interrupted

    try:
        run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
        mark_interrupted(cfg.store.url or default_store_url(out), run_id, resume_with)
    except (OSError, ValueError, KeyError, StoreError):  # interrupted before the run began
        pass


def _quiet_interrupt(signum, frame) -> None:
    """Ctrl-C or SIGTERM: Ray's actors get it too and die mid-task, and Flower's threads
    would log each death with its traceback before the interrupt reaches `sim run`;
    silence them first."""
    import logging
    import threading

    for name in ("flwr", "ray", "consortia"):  # ours: replies from the actors Ray ends
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    threading.excepthook = lambda args: None
    raise KeyboardInterrupt


@sim_app.command("run")
def sim_run(
    config: Path = typer.Argument(..., help="experiment TOML"),
    out: Path = typer.Option(..., "--out", help="results directory"),
    overrides: list[str] | None = SetOption,
    resume: bool = typer.Option(False, "--resume",
                                help="continue the run in --out from its latest checkpoint"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's own log"),
) -> None:
    """Run a federation of virtual clients; write metrics.jsonl, summary.json and checkpoints to --out."""
    from consortia.simulations.runner import RUN_ERRORS, run_simulation

    cfg = _load(config, overrides)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    previous = {sig: signal.signal(sig, _quiet_interrupt)  # Ctrl-C, and what `timeout`,
                for sig in (signal.SIGINT, signal.SIGTERM)}    # systemd and schedulers send
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{cfg.task}", total=cfg.rounds,
                                status="checking data, model and privacy terms...")

        def on_round(row: dict) -> None:
            eps = row["epsilon_max"]
            evaluated = (f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}  "
                         if row.get("accuracy") is not None else "")
            status = (f"{evaluated}trained "
                      f"{row['clients_trained']}/{row['clients_sampled']}"
                      + (f"  ε max {epsilon_text(eps)}" if eps is not None else ""))
            progress.update(bar, completed=row["round"], status=status)

        try:
            summary = run_simulation(cfg, out, resume=resume, on_round=on_round, verbose=verbose,
                                     on_status=lambda text: progress.update(bar, status=text))
        except RUN_ERRORS as err:
            if not progress.tasks[0].completed:  # no round ran: no bar saying it started
                progress.remove_task(bar)
            raise fail(err) from None
        except KeyboardInterrupt:
            # Flower's ServerApp thread would wait for replies from Ray actors that are
            # gone; checkpoints and ledgers are written atomically, so leave at once,
            # with the run recorded as stopped rather than running.
            progress.stop()
            resume_with = resume_command(config, out, overrides)
            record_stopped(cfg, out, resume_with)
            say(f"interrupted; continue with: {resume_with}")
            os._exit(130)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        progress.update(bar, completed=summary.get("rounds_completed", cfg.rounds))
    acc = summary["final_accuracy"]
    done = summary.get("rounds_completed", 0)
    if acc is not None:
        console.print(f"final accuracy {acc:.4f}")
    elif done:  # stopped early between evaluations (eval_every)
        console.print(f"final accuracy not measured: the run ended after round {done} of "
                      f"{summary.get('rounds', cfg.rounds)}, before its next evaluation "
                      f"(eval_every = {cfg.eval_every})")
    else:
        console.print("no round completed")
    total = summary.get("rounds", cfg.rounds)
    if 0 < done < total:  # a run ends early only on a stop request (runs stop, the console)
        say(f"stopped after round {done} of {total} (a stop request); continue with: "
            f"{resume_command(config, out, overrides)}")
    typer.echo(f"results: {out.resolve()}  (metrics.jsonl, summary.json, checkpoints/)")


@app.command("export")
def export(
    results_dir: Path = typer.Argument(..., help="a run's results directory (its --out)"),
    out: Path = typer.Option(..., "--out", help="new directory for the Hugging Face model"),
) -> None:
    """The run's final model, adapters merged, in Hugging Face format, with its manifest."""
    from consortia.server.export import ExportError, export_run
    from consortia.tasks.adapters import MissingPackage

    try:
        path = export_run(results_dir, out)
    except (ExportError, ConfigError, MissingPackage) as err:
        raise fail(err) from None
    typer.echo(f"exported: {path.resolve()}  (from_pretrained loads it; consortia-manifest.json "
               "says what it is)")


@sim_app.command("sweep")
def sim_sweep(
    config: Path = typer.Argument(..., help="experiment TOML"),
    grid: list[str] = typer.Option(..., "--grid", help="key=v1,v2,... (repeat for more keys)"),
    out: Path = typer.Option(..., "--out", help="sweep directory: one run per cell, sweep.csv"),
    overrides: list[str] | None = SetOption,
) -> None:
    """Run every combination of the --grid values (finished cells are skipped); write sweep.csv."""
    from consortia.simulations.sweep import run_sweep

    running: list[Path] = []  # the cell now running

    def on_cell(i: int, total: int, name: str, done: bool) -> None:
        console.print(f"[{i + 1}/{total}] {name}" + (" (done, skipped)" if done else ""))
        running[:] = [] if done else [out / name]

    console.print("checking every cell's config, data, model and privacy terms...")
    previous = {sig: signal.signal(sig, _quiet_interrupt)  # as sim run: Ray's actors die
                for sig in (signal.SIGINT, signal.SIGTERM)}    # too, Flower's threads wait
    try:
        path = run_sweep(config, grid, out, overrides, on_cell=on_cell)
    except ConfigError as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        sets = [arg for value in overrides or [] for arg in ("--set", value)]
        again = shlex.join(["consortia", "sim", "sweep", str(config), "--out", str(out),
                            *[arg for spec in grid for arg in ("--grid", spec)], *sets])
        for cell in running:  # recorded stopped, as sim run records an interrupted run
            _record_cell_stopped(cell, again)
        say(f"interrupted; finished cells are kept, continue with: {again}")
        os._exit(130)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo(f"sweep: {path.resolve()}")


def _record_cell_stopped(cell: Path, resume_with: str) -> None:
    """An interrupted sweep's running cell, recorded stopped under the config it runs."""
    from consortia.config import validate_config
    from consortia.server.run_dir import RUN_FILE

    try:
        cfg = validate_config(json.loads((cell / RUN_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError):  # interrupted before the cell's run began
        return
    record_stopped(cfg, cell, resume_with)


@sim_app.command("compare")
def sim_compare(
    runs: list[Path] = typer.Argument(..., help="run directories"),
    out: Path = typer.Option(..., "--out", help="HTML file to write"),
) -> None:
    """Overlay runs (accuracy, loss, largest client ε) in one self-contained HTML page."""
    from consortia.simulations.report import unread_rows, write_comparison

    # A shell glob over a sweep's folder (results/sweep/*) also names its sweep.csv: files
    # are passed over, saying so; a folder that is not a run still fails.
    files = [r for r in runs if r.is_file()]
    if files:
        say(f"not run directories, left out: {', '.join(str(f) for f in files)}")
    runs = [r for r in runs if not r.is_file()]
    if not runs:
        raise fail("no run directory given (a run directory holds metrics.jsonl)")
    try:
        path = write_comparison(runs, out)
    except FileNotFoundError as err:
        raise fail(err) from None
    typer.echo(f"comparison: {path.resolve()}")
    for note in (note for run in runs for note in unread_rows(run)):
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


@sim_app.command("report")
def sim_report(run: Path = typer.Argument(..., help="run directory")) -> None:
    """(Re)write RUN/report.html from the run's files."""
    from consortia.simulations.report import unread_rows, write_report

    try:
        typer.echo(f"report: {write_report(run).resolve()}")
    except FileNotFoundError as err:
        raise fail(err) from None
    for note in unread_rows(run):
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


@bench_app.command("sim")
def bench_sim(
    clients: int = typer.Option(1000, "--clients", help="virtual clients"),
    per_round: int = typer.Option(100, "--per-round", help="clients sampled per round"),
    rounds: int = typer.Option(4, "--rounds", help="rounds of each (the first is left out)"),
    poll_interval_s: float | None = typer.Option(
        None, "--poll-interval-s", help="ours: sim.poll_interval_s (default: the config's)"),
    flower_poll_interval_s: float | None = typer.Option(
        None, "--flower-poll-interval-s",
        help="bare Flower: its grid's pull_interval (default: Flower's own)"),
    dispatch: str | None = typer.Option(
        None, "--dispatch", help="ours: sim.dispatch, prompt or flower (default: the config's, prompt)"),
    flower_dispatch: str = typer.Option(
        "flower", "--flower-dispatch",
        help="bare Flower: flower (its own loop, the default) or prompt (ours)"),
) -> None:
    """ms per client and round with no training: our runner vs a bare Flower simulation."""
    from consortia.simulations.bench_sim import bench_sim as run

    try:
        result = run(clients=clients, per_round=per_round, rounds=rounds,
                     poll_interval_s=poll_interval_s,
                     flower_poll_interval_s=flower_poll_interval_s, dispatch=dispatch,
                     flower_dispatch=flower_dispatch)
    except ConfigError as err:
        raise fail(err) from None
    typer.echo(json.dumps(result))


@bench_app.command("dp")
def bench_dp(
    task: str = typer.Option("fashion-mnist-cnn", help="task whose model to time"),
    batch_size: int = typer.Option(64),
    steps: int = typer.Option(20, help="timed steps per mode (after 3 warm-up steps)"),
    repeats: int = typer.Option(3, help="repeats; the median is reported"),
) -> None:
    """ms per DP-SGD step: non-private vs Opacus per-sample hooks vs ghost clipping."""
    from consortia.simulations.bench import bench_dp as run

    try:
        result = run(task=task, batch_size=batch_size, steps=steps, repeats=repeats)
    except ValueError as err:  # an unknown task, sizes it cannot run with: named in the message
        raise fail(err) from None
    typer.echo(json.dumps(result))


@bench_app.command("secagg")
def bench_secagg(
    clients: int = typer.Option(30, "--clients", help="virtual clients, all in every round"),
    params: int = typer.Option(1_000_000, "--params", help="float32 parameters in the model"),
    rounds: int = typer.Option(3, "--rounds", help="rounds of each kind; medians are reported"),
    cpus_per_client: float = typer.Option(0.5, "--cpus-per-client",
                                          help="Ray CPUs per virtual client (actors = cores / this)"),
    pull_interval: float = typer.Option(
        0.01, "--pull-interval",
        help="s between the grid's polls for replies, all three kinds alike (a run: sim.poll_interval_s); "
             "0 keeps Flower's default, 0.1"),
    dispatch: str = typer.Option(
        "prompt", "--dispatch",
        help="the engine's dispatch, all three kinds alike (a run: sim.dispatch): prompt or flower"),
    unmask: str = typer.Option(
        "cover", "--unmask",
        help="ours: whom the unmask request goes to (a run: secagg.unmask): cover or all"),
    cpu_split: bool = typer.Option(
        False, "--cpu-split",
        help="also report each exchange's CPU seconds by process (server, client actors, Ray); "
             "adds a few ms a round, so not for the headline figures"),
    stream_code: str = typer.Option(
        None, "--stream-code",
        help="ours: the code that draws the mask streams, gcm or ctr (OpenSSL's) or vaes (ours, "
             "where built and the CPU has VAES); default: each process times them and keeps "
             "the fastest"),
) -> None:
    """s per round: plain FedAvg vs our secure aggregation vs Flower's SecAgg+, one simulation."""
    from consortia.simulations.bench_secagg import bench_secagg as run

    try:
        result = run(clients=clients, params=params, rounds=rounds,
                     cpus_per_client=cpus_per_client,
                     pull_interval=None if pull_interval == 0 else pull_interval,
                     dispatch=dispatch, unmask=unmask, cpu_split=cpu_split,
                     stream_code=stream_code)
    except ValueError as err:  # sizes it cannot run with, named in the message
        raise fail(err) from None
    typer.echo(json.dumps(result))



# --- operator console and run store (issue 7) ---------------------------------------------

console_app = typer.Typer(help="The operator console: a web page and JSON API over a run store.",
                          invoke_without_command=True)
runs_app = typer.Typer(help="Runs in a run store (operators): list, show, stop.",
                       no_args_is_help=True)
app.add_typer(console_app, name="console")
app.add_typer(runs_app, name="runs")

StoreOption = typer.Option(
    None, "--store", envvar="CONSORTIA_STORE",
    help="run store: sqlite:///PATH or postgresql://... URL, a .db file, or a results directory")
TokenFileOption = typer.Option(
    None, "--token-file", envvar="CONSORTIA_CONSOLE_TOKEN_FILE",
    help="where the console token's hash is kept (default ~/.config/consortia/console-token)")
JsonOption = typer.Option(False, "--json", help="print JSON (for scripts)")


def _open_store(store: str | None):
    from sqlalchemy.engine import make_url

    from consortia.server.store import STORE_FILE, RunStore, StoreError, resolve_store_url

    if not store:
        console.print("[red]error:[/red] no run store: pass --store URL (or a results directory) "
                      "or set CONSORTIA_STORE")
        raise typer.Exit(2)
    try:
        resolved = resolve_store_url(store)
        url = make_url(resolved)
        file = (Path(url.database) if url.get_backend_name() == "sqlite"
                and url.database not in (None, "", ":memory:") else None)  # a SQLite file's
        if file is not None and file.is_dir():
            raise StoreError(f"--store {store!r} names the folder {url.database}, not a SQLite "
                             f"file: pass the folder as a path (--store {url.database}, its "
                             f"{STORE_FILE}) or the file's URL")
        if file is not None and not file.is_file():
            folder = file.parent
            elsewhere = _store_url_of_run(folder)
            if elsewhere is not None:  # the run records in the store its store.url names
                run_id, shown = elsewhere
                relative = "://" not in shown and not Path(shown).expanduser().is_absolute()
                raise StoreError(f"{folder} holds run {run_id}, which records in the store "
                                 f"its store.url names, not in {folder / STORE_FILE}: pass "
                                 f"--store {shlex.quote(shown)}"
                                 + (" (relative to the folder the run was started in)"
                                    if relative else ""))
            cells = sorted(p.parent for p in folder.glob(f"*/{STORE_FILE}")) \
                if folder.is_dir() else []
            if cells:  # a sweep's --out: each cell is a run with its own results directory
                shown = ", ".join(str(c) for c in cells[:5]) + (", ..." if len(cells) > 5 else "")
                raise StoreError(f"{folder} holds no {STORE_FILE} (from --store {store!r}), but "
                                 f"{len(cells)} of its folders do, each a run's results "
                                 f"directory (a sweep's cells): {shown}; pass one of them, or "
                                 "give every run one store with store.url")
            raise StoreError(f"no run store at {url.database} (from --store {store!r}) yet: "
                             "a run creates DIR/store.db in its results directory as it "
                             "starts (sim run --out DIR; server start: [server] out in "
                             "server.toml, once its SuperLink is up), or the file its "
                             "store.url names; start the run, then pass that file or DIR")
        return RunStore(resolved, create=False)  # str(url) would be the password as ***
    except StoreError as err:
        raise fail(err) from None


@contextmanager
def _store_read(run_store):
    """A read of the store that fails (its file damaged or removed, its server down) is
    one line saying which store and what to do, not a traceback."""
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except DBAPIError as err:
        raise fail(run_store.unusable(err, "read")) from None


def _store_url_of_run(folder: Path) -> tuple[str, str] | None:
    """(run id, store URL with its password masked) when `folder` is a run's results
    directory whose run.json sets store.url; else None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from consortia.server.run_dir import RUN_FILE

    try:
        run = json.loads((folder / RUN_FILE).read_text())
        url = run["config"]["store"]["url"]
        run_id = str(run["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(url, str) or not url:
        return None
    if "://" in url:
        try:
            url = make_url(url).render_as_string(hide_password=True)
        except ArgumentError:
            return None
    return run_id, url


def _resolve_run(run_store, run: str) -> str:
    from consortia.server.store import UnknownRun

    try:
        return run_store.resolve_run(run)
    except UnknownRun as err:
        raise fail(err, 1) from None


def _when(t: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _eps(v: float | None) -> str:
    return "-" if v is None else epsilon_text(v)


def _json(value: Any) -> str:
    """Strict JSON for scripts, as the console's API gives it: a NaN or infinite number (a
    diverging run's loss) is null; json.dumps would write NaN / Infinity, which JSON has not."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, allow_nan=False)


def _cells(*values: object) -> list:
    """A table row of the store's text as it is: rich would read a reason's '[...]' as
    markup (dropping it, or failing on a closing tag that opens nothing)."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


@console_app.callback()
def console_serve(
    ctx: typer.Context,
    store: str | None = StoreOption,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; 127.0.0.1 keeps it local"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    token_file: Path | None = TokenFileOption,
) -> None:
    """Serve the console (page + JSON API) over a run store; every route needs the token."""
    if ctx.invoked_subcommand is not None:
        # `console --token-file X token` means X: the subcommand reads it from here.
        ctx.obj = {"token_file": token_file}
        return
    from consortia.server.console import ConsoleToken, TokenError, serve
    from consortia.server.console.app import listen

    run_store = _open_store(store)
    try:
        sock = listen(host, port)
    except OSError as err:
        hint = {errno.EADDRINUSE: "choose another --port, or stop what listens there",
                errno.EACCES: "choose another --port (below 1024 needs root)"}.get(
            err.errno, "give --host a name or address of this machine")
        raise fail(f"cannot serve the console on {host}:{port}: "
                   f"{err.strerror or err}; {hint}") from None
    token = ConsoleToken(token_file)
    try:
        new = token.ensure()
    except TokenError as err:
        raise fail(err) from None
    shown_host = f"[{host}]" if ":" in host else host
    if new is not None:
        console.print(f"console token made; only its hash is kept, in {token.path} (0600). "
                      "It is shown once:")
        typer.echo(f"http://{shown_host}:{port}/?token={new}")
    else:
        console.print(f"token from {token.path} (forgot it? `consortia console token` makes a new one)")
        console.print(f"open http://{shown_host}:{port}/?token=YOUR_TOKEN")
    if not is_loopback(host):
        console.print(f"[yellow]warning:[/yellow] bound to {host}: reachable from other machines, "
                      "over plain HTTP; put a TLS proxy in front")
    console.print(f"console on http://{shown_host}:{port}, store {run_store.display_url}")
    serve(run_store, token, host=host, port=port, sock=sock)


@console_app.command("token")
def console_token(ctx: typer.Context, token_file: Path | None = TokenFileOption) -> None:
    """Make a new console token (the old one stops working at once) and print it once."""
    from click.core import ParameterSource

    from consortia.server.console import ConsoleToken, TokenError

    # --token-file before `token` (the console's own option, as the console was started)
    # was ignored: the default file was rotated and the console's old token kept working.
    given_here = ctx.get_parameter_source("token_file") == ParameterSource.COMMANDLINE
    parent = (ctx.obj or {}).get("token_file")
    if not given_here and parent is not None:
        token_file = parent
    token = ConsoleToken(token_file)
    try:
        new = token.rotate()
    except TokenError as err:
        raise fail(err) from None
    console.print(f"new console token; only its hash is kept, in {token.path} (0600). "
                  "It is shown once:")
    typer.echo(new)


@runs_app.command("ls")
def runs_ls(store: str | None = StoreOption, as_json: bool = JsonOption) -> None:
    """List the runs in the store, newest first."""
    from rich.table import Column, Table

    run_store = _open_store(store)
    with _store_read(run_store):
        runs = run_store.list_runs()
    if as_json:
        typer.echo(_json(runs))
        return
    table = Table("task", "kind", "status", "rounds", "started", "updated", "stop requested")
    table.columns.insert(0, Column("run", no_wrap=True, min_width=12))  # ids are to be copied
    for r in runs:
        table.add_row(*_cells(r["run_id"], r["task"], r["kind"], r["status"],
                              f"{r['rounds_completed']}/{r['rounds_total']}",
                              _when(r["created_at"]), _when(r["updated_at"]),
                              f"{r['stop_requested_by']} {_when(r['stop_requested_at'])}"
                              if r["stop_requested_at"] else ""))
    Console().print(table if runs else "no runs in this store")


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="run id (or a unique prefix)"),
              store: str | None = StoreOption, as_json: bool = JsonOption) -> None:
    """One run: status, rounds, clients (ε against budget), checkpoints, recent audit log."""
    from rich.table import Table

    run_store = _open_store(store)
    with _store_read(run_store):
        run_id = _resolve_run(run_store, run)
        info = {"run": run_store.get_run(run_id), "rounds": run_store.rounds(run_id),
                "clients": run_store.clients(run_id), "checkpoints": run_store.checkpoints(run_id),
                "audit": run_store.audit_log(run_id, limit=20)}
    if as_json:
        typer.echo(_json(info))
        return
    r, out = info["run"], Console()
    out.print(f"[bold]run {escape(r['run_id'])}[/bold]  " + escape(
        f"{r['task']}  {r['status']}  round {r['rounds_completed']}/{r['rounds_total']}  "
        f"started {_when(r['created_at'])}"
        + (f"  stop requested by {r['stop_requested_by']}" if r["stop_requested_at"] else "")))
    rounds = Table("round", "accuracy", "loss", "trained", "refused", "rejected", "failed", "ε max",
                   "secagg", "duration s", title="rounds")
    for x in info["rounds"]:
        rounds.add_row(*_cells(x["round"], _fmt(x["accuracy"]), _fmt(x["loss"]),
                               x["clients_trained"], x["clients_refused"], x["clients_rejected"],
                               x["clients_failed"], _eps(x["epsilon_max"]),
                               x["secagg_status"] or "-", _fmt(x["duration_s"], 1)))
    fallback = any(c.get("epsilon_if_secagg_fails") is not None for c in info["clients"])
    clients = Table("client", "status", "rounds joined", "last seen", "ε", "δ", "budget",
                    *(["ε if secagg fails"] if fallback else []), "reason", title="clients")
    for c in info["clients"]:
        # δ is each client's own (a partner's site.toml sets it), the δ of its ε.
        clients.add_row(*_cells(c["client_id"], c["status"], c["rounds_joined"],
                                f"round {c['last_seen_round']}", _eps(c["epsilon"]),
                                "-" if c.get("delta") is None else f"{c['delta']:g}",
                                _fmt(c["epsilon_budget"], 2),
                                *([_eps(c["epsilon_if_secagg_fails"])] if fallback else []),
                                c["reason"]))
    checkpoints = Table("round", "sha256", "parent", title="checkpoints")
    for c in info["checkpoints"]:
        checkpoints.add_row(*_cells(c["round"], c["sha256"][:16], (c["parent_sha256"] or "-")[:16]))
    audit = Table("time", "actor", "event", "detail", title="audit log (latest 20)")
    for e in info["audit"]:
        audit.add_row(*_cells(_when(e["at"]), e["actor"], e["event"], e["detail"]))
    for table in (rounds, clients, checkpoints, audit):
        out.print(table)


@runs_app.command("stop")
def runs_stop(run: str = typer.Argument(..., help="run id (or a unique prefix)"),
              store: str | None = StoreOption, as_json: bool = JsonOption) -> None:
    """Ask a running run to stop after its current round (its checkpoint stays intact)."""
    import getpass

    from sqlalchemy.exc import DBAPIError

    from consortia.server.store import RunNotRunning
    from consortia.server.store.store import is_damaged

    run_store = _open_store(store)
    with _store_read(run_store):
        run_id = _resolve_run(run_store, run)
    try:
        info = run_store.request_stop(run_id, actor=f"cli:{getpass.getuser()}")
    except RunNotRunning as err:
        raise fail(err, 1) from None
    except DBAPIError as err:  # a store this user may read but not write, a lock held too long
        if is_damaged(err):
            raise fail(run_store.unusable(err, "written")) from None
        raise fail(f"cannot record the stop request in the run store "
                   f"{run_store.display_url}: {err.orig}; a stop is a write to the store, "
                   "which the running server reads: run this as a user that can write it") from None
    if as_json:
        typer.echo(_json(info))
    else:
        typer.echo(f"stop requested for run {run_id}: it stops after round "
                   f"{info['rounds_completed'] + 1} (or the current one), checkpoint intact")


@bench_app.command("console")
def bench_console(
    readers: int = typer.Option(20, "--readers", help="concurrent readers polling the run page's API"),
    rounds: int = typer.Option(6, "--rounds", help="rounds of the digits simulation that writes"),
    clients: int = typer.Option(4, "--clients"),
    think_s: float = typer.Option(0.25, "--think-s", help="each reader's pause between page loads"),
) -> None:
    """Run-page API latency (p50/p95) with concurrent readers while a simulation writes to SQLite."""
    from consortia.simulations.bench_console import bench_console as run

    typer.echo(json.dumps(run(readers=readers, rounds=rounds, clients=clients, think_s=think_s)))

# --- end of operator console and run store ------------------------------------------------


if __name__ == "__main__":
    app()
