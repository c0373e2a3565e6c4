"""site.toml: who this site is, where the server is, its data, its state and its policy.

    [site]
    name = "site-a"                 # the enrolled node name (the server records its own
                                    # enrolled name for this node's key, and warns if they differ)
    superlink = "fl.example.org:9093"
    ca_cert = "keys/ca.pem"         # the consortium CA (verifies the server)
    node_key = "keys/node.key"      # this site's private node key (0600)
    state_dir = "state"             # privacy ledger, audit log (never leave the site)
    task = "digits-mlp"             # the model recipe this site's data fits

    [data]                          # client/data.py: partition, csv, parquet, folder, hook
    kind = "csv"
    path = "data/train.csv"
    label_column = "label"

    [policy]                        # client/policy.py
    tasks = ["digits-mlp"]
    epsilon_budget = 3.0
    delta = 1e-5
    min_noise_multiplier = 0.8
    max_rounds = 20

Relative paths are read from the folder that holds site.toml.
"""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consortia.client.policy import SitePolicy
from consortia.config import ConfigError, _format_errors, known_task, read_toml, split_host_port
from consortia.privacy.certs import (
    NAME_PATTERN,
    CertsError,
    check_validity,
    load_certificates,
    load_node_private_key,
)
from consortia.tasks import import_task_modules, importable_from

# A DNS name (the host of site.superlink, when it is no IP address).
_DIALLABLE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                        r"[A-Za-z0-9])?)*\.?")


class _Section(BaseModel):
    # As the run's config (consortia/config.py): unknown keys are errors, each value has
    # its TOML type (`require_secagg = "yes"`, `max_rounds = "3"` are mistakes to name, not
    # to coerce) and every number is finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# A path, written in site.toml as a string.
TomlPath = Annotated[Path, Field(strict=False)]


class SiteSection(_Section):
    name: str = Field(pattern=NAME_PATTERN.pattern, description="the enrolled node name")
    superlink: str = Field(description="host:port of the consortium's SuperLink")
    ca_cert: TomlPath
    node_key: TomlPath
    state_dir: TomlPath
    task: str
    task_modules: list[str] = Field(
        default_factory=list, description="modules that register your own tasks (register_task)")

    @field_validator("superlink")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if "://" in value:  # the SuperNode takes no scheme: it always dials over TLS
            raise ValueError("expected host:port with no scheme (e.g. fl.example.org:9093; "
                             "the connection is always TLS)")
        host, _ = split_host_port(value)
        if not _DIALLABLE.fullmatch(host):  # Flower takes ' host' and dials it in vain
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError("expected host:port, the host an IP address or a DNS name "
                                 "(e.g. fl.example.org:9093, 203.0.113.7:9093, [::1]:9093)"
                                 ) from None
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return known_task(value)


class DataSection(_Section):
    """Where the site's training records come from (client/data.py reads them)."""

    kind: Literal["partition", "csv", "parquet", "folder", "hook"]
    path: TomlPath | None = Field(None, description="csv, parquet: a file; folder: a directory")
    label_column: str = Field("label", description="csv, parquet: the label's column")
    hook: str | None = Field(None, description='hook: "package.module:function" returning a '
                                               "torch Dataset of (features, label)")
    index: int | None = Field(None, ge=0, description="partition: this site's share")
    count: int | None = Field(None, ge=1, description="partition: how many shares")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DataSection:
        needs = {"csv": ["path"], "parquet": ["path"], "folder": ["path"], "hook": ["hook"],
                 "partition": ["index", "count"]}[self.kind]
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"data.kind = {self.kind!r} needs data.{', data.'.join(missing)}")
        if self.kind == "partition" and self.index >= self.count:
            raise ValueError(f"data.index ({self.index}) must be below data.count ({self.count})")
        return self


class SiteConfig(_Section):
    site: SiteSection
    data: DataSection | None = None  # none: the Python API's join_federation(dataset=...)
    policy: SitePolicy

    @model_validator(mode="after")
    def _task_in_policy(self) -> SiteConfig:
        if self.site.task not in self.policy.tasks:
            raise ValueError(f"site.task {self.site.task!r} is not in policy.tasks "
                             f"{self.policy.tasks}: this site would refuse every request")
        return self

    def check_files(self) -> None:
        """Fail at start, naming the file, when the CA or the node key is missing, is not
        what the SuperNode can load, or the key is readable by others."""
        if not self.site.ca_cert.is_file():
            raise ConfigError(f"site.ca_cert: {self.site.ca_cert} not found (the consortium's "
                              "ca.pem, from the operator)")
        try:
            # A bundle serves while one of its CAs is valid (TLS tries each).
            expired = []
            for cert in load_certificates(self.site.ca_cert):
                try:
                    check_validity(cert, self.site.ca_cert, "ask the operator for the "
                                   "consortium's current ca.pem")
                    break
                except CertsError as err:
                    expired.append(err)
            else:
                raise expired[0]
        except CertsError as err:
            raise ConfigError(f"site.ca_cert: {err} (the consortium's ca.pem, from the "
                              "operator)") from None
        key = self.site.node_key
        if not key.is_file():
            raise ConfigError(f"site.node_key: {key} not found (from `consortia certs keygen` "
                              "or the operator's `certs enroll`)")
        try:  # first: node.pub (0644, as keygen writes it) is the wrong file, not one to chmod
            load_node_private_key(key)
        except CertsError as err:
            raise ConfigError(f"site.node_key: {err}") from None
        if stat.S_IMODE(key.stat().st_mode) & 0o077:
            raise ConfigError(f"site.node_key: {key} is readable by others "
                              f"({oct(stat.S_IMODE(key.stat().st_mode))}); accepted: 0600 "
                              f"(chmod 600 {key})")


def site_config_from_dict(data: dict[str, Any], base: Path, source: str = "site config"
                          ) -> SiteConfig:
    importable_from(base)  # task_modules and data.hook may live beside site.toml
    try:
        import_task_modules(list(data.get("site", {}).get("task_modules", [])),
                            "site.task_modules")
        cfg = SiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, SiteConfig)) from None
    except ValueError as err:
        raise ConfigError(f"invalid configuration ({source}): {err}") from None
    s = cfg.site
    s.ca_cert, s.node_key, s.state_dir = ((base / p).resolve()
                                          for p in (s.ca_cert, s.node_key, s.state_dir))
    if cfg.data is not None and cfg.data.path is not None:
        cfg.data.path = (base / cfg.data.path).resolve()
    return cfg


def load_site_config(path: str | Path, overrides: list[str] | None = None) -> SiteConfig:
    path = Path(path)
    data = read_toml(path, "site config", overrides)
    return site_config_from_dict(data, path.resolve().parent, str(path))
