"""The run configuration: one pydantic schema, loaded from TOML, overridable with --set.

Every field is validated when the run starts (unknown key, wrong type, out of range,
cross-field rules such as ``clients_per_round <= clients``), so a bad config fails at
start, not at round 7.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def known_task(value: str) -> str:
    """`value` if it names a registered task; else an error listing the accepted ones."""
    from consortia.tasks import TASKS  # late import: tasks import torch

    if value not in TASKS:
        raise ValueError(f"unknown task {value!r}; accepted: {', '.join(sorted(TASKS))}")
    return value


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad key and what is accepted."""


def split_host_port(value: str, what: str = "(e.g. fl.example.org:9093)") -> tuple[str, int]:
    """(host, port) of "host:port" ("[::1]:9093" for IPv6); a ValueError saying what is
    expected otherwise (a validator's message, which names the key and the value)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port {what}")
    return host.strip("[]"), int(port)


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `privacy.epsilon_budjet` must not be ignored.
    # Strict types: TOML (and --set, read as TOML) gives each value its own type, so
    # `clients = true`, `privacy.enabled = 1` or `rounds = "3"` is a mistake to name, not
    # one to coerce (lax pydantic would run clients = 1); an int is still a float. Every
    # number is finite: `lr = inf` or `faults.straggler_s = inf` would fail mid-run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "natural"] = Field(
        "iid", description="natural: the clients the task's data comes split into (Shakespeare roles)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller is more skewed")
    min_samples: int = Field(
        10, ge=1, description="Dirichlet partitions are redrawn until each client has this many"
    )


class PrivacyConfig(_Section):
    enabled: bool = True
    epsilon_budget: float = Field(3.0, gt=0, description="per-client epsilon budget")
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="sigma; leave unset to derive it so the planned participation fits the budget",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clipping bound C")
    accountant: Literal["rdp", "prv"] = "rdp"
    mode: Literal["local", "distributed"] = Field(
        "local", description='"local": each client runs DP-SGD with its full noise; '
        '"distributed": one DP step per round, noise split among the clients under secure '
        "aggregation (needs secagg.enabled)")
    grad_sample_mode: Literal["auto", "hooks", "ghost"] = Field(
        "auto", description="Opacus per-sample clipping: auto is the task's choice (ghost "
                            "clipping for the transformer tasks, hooks otherwise)")


class UserDPConfig(_Section):
    """User-level DP (DP-FedAvg): each client's whole contribution is protected."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0, description="z: noise std / clip of the sum")
    clip: float = Field(1.0, gt=0, description="L2 clip of each update (initial, if adaptive)")
    target_quantile: float | None = Field(
        None, gt=0, lt=1, description="adaptive clipping toward this quantile of update norms")
    clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: geometric step")
    count_noise: float | None = Field(
        None, gt=0, description="adaptive clipping: std of the clipped-count noise (default K/20)")
    noise_at: Literal["server", "clients"] = "server"


class SecAggConfig(_Section):
    """Secure aggregation (SecAgg+, `privacy/secagg/`): the server sees only the sum."""

    enabled: bool = False
    threshold: float | None = Field(
        None, gt=0,
        description="Shamir threshold per client: a count of its k+1 share holders (>= 2), or a "
                    "fraction in (0, 1) of them; default a strict majority")
    neighbours: int | None = Field(None, ge=2, description="k; default the even number >= log2(n)")
    clip: float = Field(10.0, gt=0, description="L2 bound on each client's weighted update")
    bits: int | None = Field(
        None, ge=2, le=31,
        description="quantization bits per value; default the most that cannot wrap for n clients")
    unmask: Literal["cover", "all"] = Field(
        "cover",
        description="whom the unmask request goes to: 'cover' asks only enough survivors to "
                    "hold t shares of every secret (the others only if some of those fail to "
                    "answer), 'all' asks every survivor")


class StrategyConfig(_Section):
    """The aggregation rule and its parameters (each applies only to the rules that take it)."""

    name: Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "krum",
                  "multikrum", "median", "trimmed-mean", "bulyan"] = "fedavg"
    server_lr: float | None = Field(None, gt=0, description="fedavgm, fedadam, fedyogi, fedadagrad")
    server_momentum: float | None = Field(None, ge=0, lt=1, description="fedavgm")
    mu: float | None = Field(None, ge=0, description="fedprox: proximal term weight")
    beta_1: float | None = Field(None, ge=0, lt=1, description="fedadam, fedyogi")
    beta_2: float | None = Field(None, ge=0, lt=1, description="fedadam, fedyogi")
    tau: float | None = Field(None, gt=0, description="fedadam, fedyogi, fedadagrad: adaptivity")
    num_malicious: int | None = Field(None, ge=0, description="krum, multikrum, bulyan: f")
    num_selected: int | None = Field(None, ge=1, description="multikrum")
    beta: float | None = Field(None, ge=0, lt=0.5, description="trimmed-mean: fraction cut per side")

    def parameters(self) -> dict[str, float | int]:
        return self.model_dump(exclude={"name"}, exclude_none=True)


class ModelConfig(_Section):
    activation: Literal["tanh", "relu"] = "tanh"
    lora_rank: int = Field(8, ge=1, description="LoRA rank r (pretrained-model tasks)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update scaled by alpha/r)")
    max_length: int = Field(64, ge=2, description="tokens per example (text tasks)")


class FaultsConfig(_Section):
    """Faults injected into simulations, chosen deterministically from the run's seed."""

    byzantine_fraction: float = Field(0.0, ge=0, lt=1, description="share of clients that attack")
    byzantine_kind: Literal["sign-flip", "scale", "gaussian"] = "sign-flip"
    byzantine_scale: float = Field(
        10.0, gt=0, description="scale: update x this; sign-flip: x -this; gaussian: noise std")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a sampled client drops, per round")
    straggler_s: float = Field(0.0, ge=0, description="each reply is delayed by up to this many seconds")


# How a simulation's engine hands messages to the clients (simulations/dispatch.py).
Dispatch = Literal["prompt", "flower"]


class SimConfig(_Section):
    num_cpus_per_client: float = Field(1.0, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    max_actors: int | None = Field(None, ge=1, description="Ray actors; default: CPUs / per-client CPUs")
    reply_timeout_s: float = Field(3600.0, gt=0)
    poll_interval_s: float = Field(
        0.02, gt=0, le=1.0,
        description="how often the server looks for replies in a simulation (Flower's "
                    "InMemoryGrid pull_interval, whose default is 0.1: every exchange "
                    "then waits up to 0.1 s after its last reply)")
    dispatch: Dispatch = Field(
        "prompt",
        description="how the simulation engine hands messages to the clients: prompt (one "
                    "pass over the queued messages, woken when the server sends; "
                    "simulations/dispatch.py) or flower (Flower's loop: every node asked in "
                    "turn, then a 0.1 s sleep)")
    ray_address: str | None = Field(
        None, description="attach to this running Ray cluster (e.g. 127.0.0.1:6379) instead "
                          "of starting one on this machine")

    @field_validator("ray_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value, "of a Ray cluster's head (e.g. 127.0.0.1:6379)")
        return value


class StoreConfig(_Section):
    """The run store that `consortia console` and `consortia runs` read (server/store/)."""

    url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///PATH or postgresql://...) or a SQLite file path; "
                    "unset: store.db inside the run's --out directory")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from consortia.server.store import StoreError, resolve_store_url  # late: sqlalchemy

        try:
            resolve_store_url(value)
        except StoreError as err:
            raise ValueError(str(err)) from None
        return value


class RunConfig(_Section):
    task: str = "digits-mlp"
    rounds: int = Field(3, ge=1)
    clients: int = Field(4, ge=1)
    clients_per_round: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)
    local_epochs: int = Field(
        1, ge=0, description="0: clients train nothing and return the model (benchmarks the "
                             "framework's own cost; needs privacy.enabled = false)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="local optimizer (adam: momentum is ignored); under DP Opacus wraps "
                           "either, and the noise is added to the gradient before it")
    data_dir: str | None = Field(None, description="where the task's dataset files are")
    eval_every: int = Field(1, ge=1, description="evaluate the global model every this many "
                            "rounds (and after the last); distributed DP runs many short rounds")
    train_examples: int | None = Field(
        None, ge=1, description="use a fixed subset of this many training examples (fast runs)")
    test_examples: int | None = Field(
        None, ge=1, description="evaluate on a fixed subset of this many test examples")
    physical_batch_size: int | None = Field(
        None, ge=1, description="DP: cut each logical batch into pieces of at most this many "
                                "(Opacus BatchMemoryManager); memory only, not privacy")
    partition: PartitionConfig = PartitionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    user_dp: UserDPConfig = UserDPConfig()
    secagg: SecAggConfig = SecAggConfig()
    strategy: StrategyConfig = StrategyConfig()
    model: ModelConfig = ModelConfig()
    faults: FaultsConfig = FaultsConfig()
    sim: SimConfig = SimConfig()
    store: StoreConfig = StoreConfig()

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return known_task(value)

    def task_options(self):
        """What the task is built with (tasks/base.py TaskOptions)."""
        from consortia.tasks import TaskOptions

        return TaskOptions(activation=self.model.activation, lora_rank=self.model.lora_rank,
                           lora_alpha=self.model.lora_alpha, max_length=self.model.max_length,
                           train_examples=self.train_examples, test_examples=self.test_examples)

    @property
    def grad_sample_mode(self) -> str:
        """The Opacus mode clients use: the configured one, or the task's for "auto"."""
        if self.privacy.grad_sample_mode != "auto":
            return self.privacy.grad_sample_mode
        from consortia.tasks import TASKS

        return TASKS[self.task].grad_sample_mode

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be at most "
                f"clients ({self.clients})"
            )
        if self.local_epochs == 0 and self.privacy.enabled:
            raise ValueError("local_epochs = 0 (no local training) needs privacy.enabled = false: "
                             "a DP client must take at least one noisy step")
        self._check_partition()
        self._check_attackers()
        self._check_model_keys()
        self._check_keys_of_features_off()
        if self.secagg.enabled:
            self._check_secagg()
        if self.user_dp.enabled:
            self._check_user_dp()
        # After those: a robust rule refused with secure aggregation or user-level DP is
        # said as that, not as a count the rule would need.
        from consortia.strategies import check_strategy

        check_strategy(self.strategy.name, self.strategy.parameters(), self.clients_per_round)
        if self.privacy.enabled and self.privacy.noise_multiplier == 0:
            raise ValueError("privacy.noise_multiplier = 0 adds no noise: ε would be infinite; "
                             "accepted: σ > 0, or leave it unset to derive σ from the budget "
                             "(to train without DP: privacy.enabled = false)")
        if self.privacy.mode == "distributed":
            self._check_distributed()
        return self

    def _check_distributed(self) -> None:
        if not self.privacy.enabled:
            raise ValueError('privacy.mode = "distributed" needs privacy.enabled = true')
        if not self.secagg.enabled:
            raise ValueError(
                'privacy.mode = "distributed" needs secagg.enabled = true: each client adds '
                "only a share of the noise, which protects it only inside a secure sum")
        if self.user_dp.enabled:
            raise ValueError('privacy.mode = "distributed" (record-level DP, noise split among '
                             "clients) cannot be combined with user_dp.enabled = true")
        from consortia.privacy.dp.distributed import choose_scale

        choose_scale(self.privacy.max_grad_norm, self.batch_size * self.clients_per_round,
                     self.privacy.noise_multiplier or 10.0, self.clients_per_round ** 0.5)
        if self.privacy.accountant != "rdp":
            raise ValueError('privacy.mode = "distributed" is accounted with the RDP accountant '
                             f'(Skellam RDP bound); got privacy.accountant = "{self.privacy.accountant}"')

    def _check_model_keys(self) -> None:
        from consortia.tasks import TASKS

        used = TASKS[self.task].model_keys
        given = _set_away_from_default("model", self.model, exclude=used)
        if given:
            raise ValueError(f"{', '.join(given)} does not apply to task {self.task!r}, which "
                             f"is built with {', '.join('model.' + key for key in used)} only: it "
                             "would be recorded but change nothing; remove it")

    def _check_keys_of_features_off(self) -> None:
        """A secagg or user_dp key set while its section is off would be recorded in the
        run and change nothing (defaults pass: a stored run's full config holds them)."""
        for name in ("secagg", "user_dp"):
            section = getattr(self, name)
            given = _set_away_from_default(name, section, exclude=("enabled",))
            if given and not section.enabled:
                verb = "have" if len(given) > 1 else "has"
                raise ValueError(f"{', '.join(given)} {verb} no effect while {name}.enabled = "
                                 "false: it would be recorded but change nothing; set "
                                 f"{name}.enabled = true to use it, or remove it")

    def _check_attackers(self) -> None:
        """A byzantine_fraction that rounds to no client would run an attack experiment
        with no attacker (simulations/faults.py draws round(fraction · clients))."""
        f = self.faults.byzantine_fraction
        if f > 0 and round(f * self.clients) == 0:
            raise ValueError(
                f"faults.byzantine_fraction = {f:g} of clients = {self.clients} is "
                f"{f * self.clients:.3g} clients, which rounds to none: the run would have no "
                f"attacker; accepted: 0 (no attack), or above {0.5 / self.clients:.3g} "
                f"(round(fraction · clients) >= 1; {1 / self.clients:.3g} is one client)")
        if f > 0 and self.privacy.enabled and self.privacy.mode == "distributed":
            # An attacker transforms the weights it trained (ByzantineUpdate); under
            # distributed DP a client sends its noisy clipped gradient sum instead, which
            # no attack here transforms: the run would name attackers that never attacked.
            raise ValueError(
                f"faults.byzantine_fraction = {f:g} with privacy.mode = 'distributed': the "
                "attacks transform a client's trained weights, and under distributed DP it "
                "sends a noisy gradient sum instead, so no client would attack; accepted: "
                "faults.byzantine_fraction = 0, or privacy.mode = 'local'")

    def _check_partition(self) -> None:
        from consortia.tasks import TASKS

        natural = TASKS[self.task].natural_partition
        if natural and self.partition.kind != "natural":
            raise ValueError(f"task {self.task!r} comes split into its natural clients: "
                             f"partition.kind must be \"natural\", got {self.partition.kind!r}")
        if natural and self.train_examples is not None:
            raise ValueError(f"train_examples = {self.train_examples} does not apply to task "
                             f"{self.task!r}: its clients are the data's own, each with all "
                             "its rows (test_examples does apply); to train on less, lower "
                             "clients")
        if not natural and self.partition.kind == "natural":
            raise ValueError(f'partition.kind = "natural" needs a task whose data names its '
                             f"clients; {self.task!r} does not: accepted iid, dirichlet")

    def _check_user_dp(self) -> None:
        from consortia.privacy.dp.user_level import update_noise_multiplier
        from consortia.strategies import NEEDS_INDIVIDUAL_UPDATES

        u = self.user_dp
        if self.strategy.name in NEEDS_INDIVIDUAL_UPDATES:
            raise ValueError(
                f"user_dp.enabled = true cannot be combined with strategy.name = "
                f"{self.strategy.name!r}: DP-FedAvg's guarantee is for the noised mean of "
                f"clipped updates; accepted: {_rules_of_the_mean()}")
        if u.noise_at == "clients" and not self.secagg.enabled:
            raise ValueError(
                'user_dp.noise_at = "clients" needs secagg.enabled = true: without secure '
                "aggregation the server would see each update with only 1/K of the noise")
        if u.target_quantile is not None:
            count_noise = u.count_noise if u.count_noise is not None else self.clients_per_round / 20
            try:
                update_noise_multiplier(u.noise_multiplier, count_noise)
            except ValueError as err:
                if u.count_noise is not None:
                    raise
                # Not the user's value: say where it came from, or it reads as a typo.
                raise ValueError(f"{err} (user_dp.count_noise is unset: its default is "
                                 f"clients_per_round / 20 = {count_noise:g})") from None

    def _check_secagg(self) -> None:
        from consortia.privacy.secagg import max_bits
        from consortia.strategies import NEEDS_INDIVIDUAL_UPDATES

        if self.strategy.name in NEEDS_INDIVIDUAL_UPDATES:
            raise ValueError(
                f"secagg.enabled = true cannot be combined with strategy.name = "
                f"{self.strategy.name!r}: that rule needs each client's update, and secure "
                f"aggregation reveals only their sum; accepted: {_rules_of_the_mean()}")
        n = self.clients_per_round
        if n < 3:
            raise ValueError(f"secure aggregation needs clients_per_round >= 3, got {n}")
        from consortia.privacy.secagg.quantize import CLIP_RANGE

        if not CLIP_RANGE[0] <= self.secagg.clip <= CLIP_RANGE[1]:
            raise ValueError(f"secagg.clip = {self.secagg.clip!r}: accepted {CLIP_RANGE[0]:g} to "
                             f"{CLIP_RANGE[1]:g} (the quantization's step and sum must stay "
                             "finite and above zero)")
        # Under distributed DP the clients put their noisy sums on the ring at the run's
        # scale themselves: bits are not used (and said so at start), so not refused either.
        distributed = self.privacy.enabled and self.privacy.mode == "distributed"
        if self.secagg.bits is not None and self.secagg.bits > max_bits(n) and not distributed:
            raise ValueError(
                f"secagg.bits = {self.secagg.bits} lets the sum of {n} clients wrap modulo "
                f"2**32; accepted: at most {max_bits(n)} for clients_per_round = {n}")
        k = self.secagg.neighbours
        if k is not None and k > n - 1:
            raise ValueError(f"secagg.neighbours = {k} exceeds clients_per_round - 1 = {n - 1}")
        t = self.secagg.threshold
        if t is not None and t >= 1 and t != int(t):
            raise ValueError(f"secagg.threshold = {t}: a count must be a whole number "
                             "(or give a fraction below 1)")
        if t is not None and t >= 1:
            from consortia.privacy.secagg import num_neighbours, share_holders

            k = num_neighbours(n, k)
            holders = share_holders(n, k)
            if not 2 <= t <= holders:
                odd = ", and an odd k on an odd ring gives each k - 1" if holders == k else ""
                raise ValueError(
                    f"secagg.threshold = {int(t)}: a count must lie in [2, {holders}], the share "
                    f"holders each client has (itself and its {holders - 1} neighbours: k = {k} "
                    f"at clients_per_round = {n}{odd}); or give a fraction in (0, 1)")

    @property
    def planned_rounds_per_client(self) -> int:
        """Rounds a client expects to join: rounds * K / N, rounded up.

        A client sized for this participation that is sampled more often than expected
        reaches its budget and refuses, which is the budget doing its job.
        """
        return -(-self.rounds * self.clients_per_round // self.clients)


def _rules_of_the_mean() -> str:
    """The strategy names that aggregate from the (weighted) mean update alone: those that
    secure aggregation and user-level DP accept."""
    from consortia.strategies import NEEDS_INDIVIDUAL_UPDATES

    rules = get_args(StrategyConfig.model_fields["name"].annotation)
    return ", ".join(r for r in rules if r not in NEEDS_INDIVIDUAL_UPDATES)


def inert_settings_warning(cfg: RunConfig) -> str | None:
    """Keys set away from their defaults that this run's other settings make inert: said at
    start, not refused, since a sweep may vary the setting that makes them count (e.g.
    --grid partition.kind=iid,dirichlet --set partition.alpha=0.1)."""
    inert = []
    if cfg.partition.kind != "dirichlet":
        given = _set_away_from_default("partition", cfg.partition, exclude=("kind",))
        inert += [f"{g} (only partition.kind = 'dirichlet' uses it; here "
                  f"{cfg.partition.kind!r})" for g in given]
    if cfg.faults.byzantine_fraction == 0:
        given = _set_away_from_default("faults", cfg.faults, exclude=(
            "byzantine_fraction", "dropout", "straggler_s"))
        inert += [f"{g} (no client attacks: faults.byzantine_fraction = 0)" for g in given]
    distributed = cfg.privacy.enabled and cfg.privacy.mode == "distributed"
    if distributed:  # the clients send a noisy gradient sum; the server takes the step
        why = "privacy.mode = 'distributed' takes one DP step per round, on the server"
        defaults = RunConfig.model_fields
        inert += [f"{key} = {getattr(cfg, key)!r} ({why})"
                  for key in ("local_epochs", "momentum", "optimizer")
                  if getattr(cfg, key) != defaults[key].default]
        if cfg.strategy.mu:  # FedProx's proximal term: a term of local training's loss
            inert.append(f"strategy.mu = {cfg.strategy.mu!r} ({why}: no local training for "
                         "FedProx's proximal term to pull toward the global model)")
        # Its clients put their noisy gradient sums on the ring themselves (scale γ), and the
        # server reads the sum back with γ: no update is clipped or quantized with these.
        quantizing = _set_away_from_default("secagg", cfg.secagg,
                                            exclude=("enabled", "threshold", "neighbours", "unmask"))
        inert += [f"{g} (privacy.mode = 'distributed' puts each noisy gradient sum on the "
                  "2**32 ring at its own scale γ, not quantized with secagg.clip and secagg.bits)"
                  for g in quantizing]
    elif cfg.optimizer == "adam" and cfg.momentum != 0:
        inert.append(f"momentum = {cfg.momentum!r} (optimizer = 'adam' does not use it)")
    if cfg.physical_batch_size is not None and not (cfg.privacy.enabled
                                                    and cfg.privacy.mode == "local"):
        why = ("privacy.enabled = false" if not cfg.privacy.enabled
               else "privacy.mode = 'distributed' takes one step per round")
        inert.append(f"physical_batch_size = {cfg.physical_batch_size} (only local DP-SGD "
                     f"cuts its batches: {why})")
    if cfg.user_dp.enabled and cfg.user_dp.target_quantile is None:
        given = [g for g in _set_away_from_default("user_dp", cfg.user_dp)
                 if g.split(" = ")[0] in ("user_dp.clip_lr", "user_dp.count_noise")]
        inert += [f"{g} (only adaptive clipping uses it: user_dp.target_quantile is unset)"
                  for g in given]
    if not inert:
        return None
    return "set but changing nothing in this run: " + "; ".join(inert)


def _set_away_from_default(name: str, section: _Section, exclude=()) -> list[str]:
    """"name.key = value" for each key of `section` (but `exclude`) not at its schema
    default."""
    return [f"{name}.{key} = {getattr(section, key)!r}"
            for key, spec in type(section).model_fields.items()
            if key not in exclude and getattr(section, key) != spec.default]


def _known_keys(model: type[BaseModel] | None, loc: tuple) -> list[str] | None:
    """The keys accepted beside the one at `loc` (a path into `model`), or None."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model is not None else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return sorted(model.model_fields) if model is not None else None


def _format_errors(err: ValidationError, source: str, model: type[BaseModel] | None = None
                   ) -> str:
    """One line per error, naming the key; an unknown key with the keys accepted there
    (`model`: the validated class) and the likeliest one meant."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if not key:  # a rule across several keys: its message names them
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, e["loc"])
            line = f"  {key}: unknown key"
            if known:
                close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
                line += (f" (did you mean {close[0]!r}?)" if close else "") + \
                    f"; accepted here: {', '.join(known)}"
            lines.append(line)
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Parse `key=value` (dotted key for sections); the value is read as a TOML value.

    `rounds=5` gives 5, `privacy.enabled=false` gives False, `task=digits-mlp` falls
    back to the bare string.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {assignment!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
            node = child
        _set(node, path[-1], value)
    return data


def _set(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, but a table given for a table merges into it, key by key (as
    TOML's dotted keys would): `--set 'privacy={enabled=true}'` must not reset the file's
    other privacy keys to their defaults."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for inner, item in value.items():
            _set(node[key], inner, item)
    else:
        node[key] = value


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, RunConfig)) from None


def read_toml(path: Path, what: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The table in the TOML file `path` with --set overrides applied; a ConfigError that
    names the file (`what not found: path`, or where its TOML is broken) otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:  # -sig: an editor's UTF-8 byte order mark (Windows Notepad) is no TOML error
        data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:  # e.g. saved as UTF-16 ("Unicode" in Notepad)
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                          "accepted: a TOML file saved as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    apply_overrides(data, overrides or [])
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from TOML (or defaults when path is None) and apply --set overrides."""
    if path is None:
        data: dict[str, Any] = {}
        apply_overrides(data, overrides or [])
        return validate_config(data, "defaults")
    return validate_config(read_toml(Path(path), "config file", overrides), str(path))


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as the same nested keys the TOML uses (None values dropped)."""
    return cfg.model_dump(mode="json", exclude_none=True)
