"""`consortia client join`: this site's SuperNode, running only the installed ClientApp.

Started here: Flower's `flower-supernode` (TLS to the SuperLink, verified against the
consortium CA; authenticated with the site's node key; `--isolation process`, so it runs
no app code itself), and in this process the loop of client/runtime.py that runs every
task with the ClientApp built from the installed consortia package, this site's data,
state directory and policy. If the SuperNode process ends (the server restarted, the
network went away), it is started again; SIGTERM or Ctrl-C stops both.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from consortia.client.client_app import build_client_app
from consortia.client.data import DataError, check_records, load_site_data
from consortia.client.policy import AuditLog
from consortia.client.runtime import serve_client_app
from consortia.client.site import Site, SitePrivacy
from consortia.client.site_config import SiteConfig, load_site_config
from consortia.flower_exec import (
    FlowerExecutableMissing,
    flower_env,
    free_port,
    require_executables,
    start_process,
    stop_process,
)
from consortia.privacy.display import epsilon_text
from consortia.privacy.dp import LedgerMismatchError
from consortia.privacy.dp.preflight import check_delta, check_dp_model
from consortia.privacy.secagg.masks import check_stream_code_env
from consortia.tasks import default_device, get_task
from consortia.tasks.adapters import MissingPackage

log = logging.getLogger("consortia.client")
RESTART_DELAY_S = 2.0
SECAGG_STATE = "secagg_session.bin"  # this site's secure-aggregation keys (0600)


class JoinError(RuntimeError):
    pass


def build_site(cfg: SiteConfig, dataset: Dataset | None = None) -> Site:
    """The Site this node serves: its data (read now, so bad data fails at start), its
    state directory (0700), its privacy terms and policy, its audit log."""
    task = get_task(cfg.site.task)
    if dataset is None and cfg.data is None:
        raise JoinError("site.toml has no [data] section: give one, or pass your Dataset "
                        "(join_federation(config, dataset=...))")
    try:
        data = dataset if dataset is not None else load_site_data(cfg.data, task)
        model = task.build_model()  # once, for the record check and the DP check
        check_records(data, task, model)
    except (DataError, MissingPackage) as err:  # MissingPackage: the task's model or data
        raise JoinError(str(err)) from None
    p = cfg.policy
    try:  # privacy terms that cannot mean anything for these records, or this model
        check_delta(p.delta, len(data), f"site {cfg.site.name!r}")
    except ValueError as err:
        raise JoinError(f"[policy] {err}") from None
    if p.require_dp:
        try:
            check_dp_model(model, f"task {task.name!r}", "[policy] require_dp = false in "
                           "site.toml, for runs without DP only")
        except ValueError as err:
            raise JoinError(str(err)) from None
    state = cfg.site.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
    except OSError as err:  # a file there (or on its path), a folder this user cannot make
        raise JoinError(f"site.state_dir: {state} cannot be used as this site's state "
                        f"directory ({err.strerror or err}); accepted: a directory this user "
                        "can create or write (it holds the ledger, audit log and keys)") from None
    return Site(client_id=cfg.site.name, task=task, dataset=data, state_dir=state,
                privacy=SitePrivacy(epsilon_budget=p.epsilon_budget, delta=p.delta,
                                    accountant=p.accountant, require_dp=p.require_dp,
                                    max_epsilon_if_secagg_fails=p.max_epsilon_if_secagg_fails),
                device=default_device(), policy=p, audit=AuditLog(state),
                secagg_state=state / SECAGG_STATE)


def ledger_line(site: Site) -> str:
    """What the site's privacy ledger holds, said when it joins: a partner whose budget is
    spent learns it now, not from refusals in the server's records. A ledger this site
    cannot use (damaged, or kept under another δ or accountant than site.toml's) fails the
    join: every DP request would be refused."""
    if site.privacy is None:
        return ""
    with site.ledger_held(True):
        try:
            ledger = site.open_ledger()
        except LedgerMismatchError as err:
            raise JoinError(f"this site's privacy ledger: {err}") from None
    spent, budget = ledger.epsilon, ledger.epsilon_budget
    if spent >= budget:
        return (f"warning: this site's privacy budget is spent (ε {epsilon_text(spent)} of {budget:.4g}"
                f" at δ = {ledger.delta:g}): it will refuse every DP request; a larger "
                "[policy] epsilon_budget is the partner's own decision")
    return f"privacy ledger: ε {epsilon_text(spent)} of {budget:.4g} spent (δ = {ledger.delta:g})"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# The specific line of Flower's exit message: "[code: 2004] Failed to activate SuperNode."
# (the SuperLink refused the node) or an SSL error ("[SSL: CERTIFICATE_VERIFY_FAILED] ...").
_SPECIFIC = re.compile(r"^\[(code: \d+|SSL[^\]]*)\]")


def exit_reason(log: str) -> str:
    """The reason a SuperNode gave for ending, from what it logged: the specific line of
    Flower's exit message, else its last error line; "" when it logged none (e.g. it was
    killed)."""
    lines = [_ANSI.sub("", line).strip() for line in log.splitlines()]
    specific = [line for line in lines if _SPECIFIC.match(line)]
    if specific:
        return specific[-1]
    errors = [line.split(":", 1)[1].strip() for line in lines if line.startswith("ERROR")]
    return errors[-1] if errors else ""


def what_to_do(reason: str, cfg: SiteConfig) -> str:
    """What a partner can do about a SuperNode's exit `reason` (exit_reason), or ""."""
    s = cfg.site
    if reason.startswith("[code: 2004]"):
        return (f"the server at {s.superlink} refused this node's key: either it is not enrolled "
                f"(send {s.node_key.with_name('node.pub')} to the operator for `consortia certs "
                "enroll`), or this node's previous SuperNode still counts as connected (it is "
                "let in once that one's heartbeat runs out, within about a minute)")
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return (f"the server's certificate did not verify against site.ca_cert ({s.ca_cert}): "
                f"either that is not the consortium's ca.pem, or the certificate does not name "
                f"the host in site.superlink ({s.superlink}); ask the operator")
    return ""


# flower-supernode retries a SuperLink it cannot reach, forever, logging this each time.
UNREACHABLE = "Connection attempt failed"
CONNECTED = "Connection successful"
UNREACHABLE_NOTE_S = 15.0  # how long it may try before the partner is told


class SuperNodeProcess:
    """flower-supernode for this site, restarted whenever it ends until stopped."""

    def __init__(self, cfg: SiteConfig, runtime_port: int):
        s = cfg.site
        self.log_path = s.state_dir / "supernode.log"
        self.env = flower_env(s.state_dir / "flwr-home")
        exe = require_executables(["flower-supernode"], self.env)["flower-supernode"]
        self.argv = [exe, "--superlink", s.superlink, "--root-certificates", str(s.ca_cert),
                     "--auth-supernode-private-key", str(s.node_key),
                     "--isolation", "process", "--host", "127.0.0.1",
                     "--port", str(runtime_port), "--node-config", f'site-name="{s.name}"']
        self.process = None

    def supervise(self, stop: threading.Event, on_restart: Callable[[int, str], None],
                  on_note: Callable[[str], None] = lambda note: None) -> None:
        """Run the SuperNode until `stop`; each time it ends, call on_restart with its exit
        code and the reason it logged (or ""), and start it again. on_note hears "unreachable"
        when a start of it has tried to reach the SuperLink for UNREACHABLE_NOTE_S in vain,
        then "connected" once it does."""
        while not stop.is_set():
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process = start_process(self.argv, self.log_path, self.env)
            started, watch = time.monotonic(), "watching"  # then "told" or "done"
            while self.process.poll() is None and not stop.wait(0.5):
                if watch == "done" or time.monotonic() - started < UNREACHABLE_NOTE_S:
                    continue
                text = self._logged_since(logged)
                if CONNECTED in text:
                    if watch == "told":
                        on_note("connected")
                    watch = "done"
                elif watch == "watching" and UNREACHABLE in text:
                    on_note("unreachable")
                    watch = "told"
            if not stop.is_set():
                on_restart(self.process.returncode, exit_reason(self._logged_since(logged)))
                stop.wait(RESTART_DELAY_S)

    def _logged_since(self, offset: int) -> str:
        """What the SuperNode logged from byte `offset` on (this start of it)."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def join(config: str | Path | SiteConfig, *, dataset: Dataset | None = None,
         log_fn: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Join the federation as this site until `stop` is set (or SIGTERM / Ctrl-C)."""
    cfg = config if isinstance(config, SiteConfig) else load_site_config(config)
    cfg.check_files()
    try:
        check_stream_code_env()
    except ValueError as err:
        raise JoinError(str(err)) from None
    site = build_site(cfg, dataset)
    said = ledger_line(site)
    stop = stop or threading.Event()
    port = free_port()
    try:
        node = SuperNodeProcess(cfg, port)
    except FlowerExecutableMissing as err:
        raise JoinError(str(err)) from None
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        on_sigterm = signal.signal(signal.SIGTERM, lambda *_: stop.set())

    advised = [""]  # the advice last given: said again only when it changes

    def restarted(code: int, why: str) -> None:
        advice = what_to_do(why, cfg)
        log_fn(f"the SuperNode exited ({code}); starting it again (see {node.log_path})"
               + (f": {why}" if why else "")
               + (f"\n  {advice}" if advice and advice != advised[0] else ""))
        advised[0] = advice

    def noted(note: str) -> None:
        if note == "unreachable":
            log_fn(f"the server at {cfg.site.superlink} does not answer yet; still trying (is it "
                   "started, and is site.superlink its address?)")
        else:
            log_fn(f"connected to {cfg.site.superlink}")

    def bundle_seen(run: str, fab_hash: str) -> None:
        seen = site.state_dir / "app-bundles.log"
        with open(seen, "a") as f:  # which bundle the server named, for the site's records
            f.write(f"{run} {fab_hash}\n")

    supervisor = threading.Thread(target=node.supervise, args=(stop, restarted, noted),
                                  daemon=True)
    supervisor.start()
    log_fn(f"{cfg.site.name}: joining {cfg.site.superlink} ({len(site.dataset)} records, state "
           f"in {site.state_dir}, SuperNode log {node.log_path})")
    if said:
        log_fn(f"{cfg.site.name}: {said}")
    try:
        serve_client_app(f"127.0.0.1:{port}", build_client_app(lambda context: site), stop,
                         on_bundle=bundle_seen)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        supervisor.join(timeout=5)
        node.stop()
        if main_thread:  # the caller's process answers SIGTERM as before again
            signal.signal(signal.SIGTERM, signal.SIG_DFL if on_sigterm is None else on_sigterm)
        log_fn(f"{cfg.site.name}: left the federation")
