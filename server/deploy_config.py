"""server.toml: where the SuperLink listens, its certificates, and the run it serves.

    [server]
    host = "0.0.0.0"          # address the SuperLink binds (Fleet + Control APIs, HTTPS)
    port = 9093
    certs = "consortium"      # from `consortia certs init` (+ `enroll`): ca.pem, server.pem,
                              # server.key, enrolled/*.pub
    out = "results/run-1"     # results, checkpoints, run store (unless run.store.url is set)

    [run]                     # the same keys as a simulation's experiment TOML
    task = "digits-mlp"
    clients = 3               # enrolled partners the run waits for
    ...

Relative paths are read from the folder that holds server.toml.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consortia.config import (
    ConfigError,
    RunConfig,
    _format_errors,
    _set_away_from_default,
    read_toml,
)
from consortia.privacy.certs import (
    CA_CERT,
    ENROLLED,
    SERVER_CERT,
    SERVER_KEY,
    CertsError,
    check_server_files,
    check_server_names,
)
from consortia.tasks import import_task_modules, importable_from


def local_host(host: str) -> str:
    """The address this machine's own processes dial a SuperLink bound to `host` at."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


class ServerSection(BaseModel):
    # As [run] (consortia/config.py): each value has its TOML type (`port = "9093"` is a
    # mistake to name) and every number is finite (`start_timeout_s = inf` would wait
    # forever for a SuperLink that does not come up); paths are read from strings.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="address the SuperLink binds")
    port: int = Field(9093, ge=1, le=65535)
    certs: Path = Field(strict=False, description="consortium directory (consortia certs init)")
    out: Path = Field(strict=False, description="results directory of the run")
    start_timeout_s: float = Field(60.0, gt=0, description="how long the SuperLink may take to start")
    task_modules: list[str] = Field(
        default_factory=list, description="modules that register your own tasks (register_task)")


class ServerDeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSection
    run: RunConfig

    @model_validator(mode="after")
    def _no_simulation_settings(self) -> ServerDeployConfig:
        """[run] takes a simulation experiment's keys, but the simulation's own (fault
        injection, Ray's resources, the simulated engine's polling and dispatch, how the
        task's training set is cut into virtual clients) would be recorded in the run and
        change nothing here, where each partner brings its own records: refused, as
        configuration.md says. At their defaults they pass (a stored run's full config
        holds them all); partition.kind = "natural" too, which a task whose data names its
        clients requires."""
        run = self.run
        given = (_set_away_from_default("run.faults", run.faults)
                 + _set_away_from_default("run.sim", run.sim, exclude=("reply_timeout_s",))
                 + _set_away_from_default("run.partition", run.partition, exclude=("kind",)))
        if run.partition.kind == "dirichlet":
            given.append("run.partition.kind = 'dirichlet'")
        if run.train_examples is not None:
            given.append(f"run.train_examples = {run.train_examples}")
        if given:
            what, it = (("is a simulation setting", "it") if len(given) == 1
                        else ("are simulation settings", "them"))
            raise ValueError(
                f"{', '.join(given)} {what} that a deployed server does not use: it would "
                f"be recorded in the run and change nothing; remove {it} (of [run.sim], a "
                "deployment uses reply_timeout_s only; each partner's [data] is its training "
                "set)")
        return self

    def check_files(self) -> None:
        """Fail at start, naming the file, if a certificate or key is missing."""
        certs = self.server.certs
        if not (certs / CA_CERT).is_file():
            raise ConfigError(f"server.certs: {certs / CA_CERT} is missing; create it with "
                              f"`consortia certs init --out {certs} --host HOST`")
        for name in (SERVER_CERT, SERVER_KEY):
            if not (certs / name).is_file():
                raise ConfigError(f"server.certs: {certs / name} is missing; issue a new one "
                                  f"from the CA with `consortia certs server --dir {certs} "
                                  "--host HOST`")
        try:  # loaded now: the SuperLink would name a file it cannot use only in its log
            check_server_files(certs)
            host = self.server.host
            check_server_names(certs, local_host(host), f"server.host = {host!r}")
        except CertsError as err:
            raise ConfigError(f"server.certs: {err}") from None
        enrolled = sorted(p.stem for p in (certs / ENROLLED).glob("*.pub"))
        if not enrolled:
            raise ConfigError(f"server.certs: no enrolled node in {certs / ENROLLED}; enroll "
                              f"partners with `consortia certs enroll NAME --dir {certs}`")
        if len(enrolled) < self.run.clients:  # the strategy waits for run.clients nodes
            raise ConfigError(
                f"run.clients = {self.run.clients}, but {len(enrolled)} node(s) are enrolled in "
                f"{certs / ENROLLED} ({', '.join(enrolled)}): the run waits for run.clients "
                f"nodes, and only enrolled nodes can connect, so it would never start; accepted: "
                f"run.clients ≤ {len(enrolled)}, or enroll more partners with `consortia certs "
                f"enroll NAME --dir {certs}`")


def load_server_config(path: str | Path, overrides: list[str] | None = None) -> ServerDeployConfig:
    path = Path(path)
    data = read_toml(path, "server config", overrides)
    importable_from(path.resolve().parent)  # task_modules may live beside server.toml
    try:
        import_task_modules(list(data.get("server", {}).get("task_modules", [])),
                            "server.task_modules")
        cfg = ServerDeployConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path), ServerDeployConfig)) from None
    except ValueError as err:
        raise ConfigError(f"invalid configuration ({path}): {err}") from None
    base = path.resolve().parent
    cfg.server.certs = (base / cfg.server.certs).resolve()
    cfg.server.out = (base / cfg.server.out).resolve()
    return cfg
