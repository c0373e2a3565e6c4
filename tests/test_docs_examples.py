"""README.md and docs/ agree with the code: their config examples load and agree with one
another, their key tables are the schemas', and the commands, files and output fields
they name exist."""

import re
import shutil
from pathlib import Path

import pytest

from consortia.client.site_config import load_site_config
from consortia.config import ConfigError, load_config
from consortia.server.deploy import base_model_sha256
from consortia.server.deploy_config import load_server_config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def toml_block(doc: str, after: str) -> str:
    """The first ```toml block in docs/`doc` after the line `after`."""
    text = (DOCS / doc).read_text()
    match = re.search(re.escape(after) + r".*?```toml\n(.*?)```", text, re.S)
    assert match, f"no toml block after {after!r} in {doc}"
    return match.group(1)


def test_the_partners_site_toml_lists_the_base_hash_of_the_operators_server_toml(tmp_path):
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(toml_block("operators.md", "## server.toml"))
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(toml_block("partners.md", "## 3. Write site.toml"))

    run = load_server_config(server_toml).run
    site = load_site_config(site_toml)
    assert site.site.task == run.task and run.task in site.policy.tasks
    # What `consortia server base-hash --config server.toml` prints for the operator's run.
    assert site.policy.base_model_sha256 == [base_model_sha256(server_toml)]


def test_the_example_configs_listed_in_configuration_md_are_those_in_the_directory():
    text = (DOCS / "configuration.md").read_text()
    listing = text[text.index("Example configs are in `simulations/experiments/`"):]
    named = set(re.findall(r"`([a-z0-9-]+\.toml)`", listing))
    experiments = DOCS.parent / "simulations" / "experiments"
    assert named == {p.name for p in experiments.glob("*.toml")}


# ---- the key tables of configuration.md, partners.md, operators.md against the schemas ----

# A default cell that says in words what an unset (None) key means.
_UNSET_WORDS = ("unset", "Flower's", "majority", "even ≥", "the most", "K / 20", "`store.db`")


def _leaves(model, prefix=""):
    """(dotted key, pydantic FieldInfo) for every leaf of a schema (a section that may be
    left out, `X | None`, included)."""
    from typing import get_args

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        sections = [a for a in (field.annotation, *get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections:
            yield from _leaves(sections[0], f"{prefix}{name}.")
        else:
            yield prefix + name, field


def _table_rows(doc: str) -> dict[str, list[str]]:
    """key -> [default, accepted, meaning] of the first `| key | default | accepted |
    meaning |` table in docs/`doc`; a row naming several keys (`a`, `b`) gives each its
    part of a default cell that lists one value per key (and of an accepted cell that
    lists them with "; ")."""
    text = (DOCS / doc).read_text()
    start = text.index("| key | default | accepted | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        keys = re.findall(r"`([a-z_0-9.]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(", ")] if len(keys) > 1 else [cells[1]]
        accepted = [a.strip() for a in cells[2].split("; ")] if len(keys) > 1 else [cells[2]]
        for i, key in enumerate(keys):
            rows[key] = [defaults[i] if len(defaults) == len(keys) else cells[1],
                         accepted[i] if len(accepted) == len(keys) else cells[2], cells[-1]]
    return rows


def _value(text: str):
    """A default cell's value: a number, a bool, `[]`, or a `quoted` string; None otherwise."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if text == "`[]`":
        return []
    if re.fullmatch(r"`[^`]+`", text):
        return text.strip("`")
    try:
        return float(text)
    except ValueError:
        return None


def _flower_defaults(key: str) -> set:
    """Flower's default for a strategy.* key, over every rule that takes it."""
    import inspect

    from consortia.strategies import RULES

    name = key.split(".", 1)[1]
    return {inspect.signature(cls.__init__).parameters[mapping[name]].default
            for cls, mapping in RULES.values() if name in mapping}


def _check_key_table(doc: str, schema: dict) -> dict[str, list[str]]:
    """Each schema key has a row in `doc`'s key table; each row names a schema key; the
    default a row states is the schema's ("required" for a key without one; for a strategy
    parameter left to Flower, Flower's), its accepted values are the Literal's, and a
    bound the row states (≥ a, > a, [a, b), (a, b], …) is the schema's."""
    from typing import Literal, get_args, get_origin

    from pydantic_core import PydanticUndefined

    rows = _table_rows(doc)
    assert set(rows) - set(schema) == set(), f"keys {doc} documents that the schema lacks"
    assert set(schema) - set(rows) == set(), f"schema keys {doc} does not document"

    for key, field in schema.items():
        default_text, accepted, _ = rows[key]
        stated = _value(default_text)
        default = field.default_factory() if field.default_factory else field.default
        if default is PydanticUndefined:
            assert default_text == "required", (key, default_text)
        elif default is None:
            if stated is not None and key.startswith("strategy."):
                assert _flower_defaults(key) == {stated}, (key, default_text)
            else:
                assert default_text.startswith(_UNSET_WORDS), (key, default_text)
        else:
            assert stated == default, (key, default_text, default)

        annotation = field.annotation
        if get_origin(annotation) is Literal:
            assert re.findall(r"`([^`]+)`", accepted) == list(get_args(annotation)), key
        bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
                  if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
        if key == "privacy.noise_multiplier":  # σ = 0 is refused by a rule with its own message
            with pytest.raises(ConfigError, match="privacy.noise_multiplier = 0 adds no noise"):
                load_config(None, ["privacy.noise_multiplier=0"])
            bounds = {"Gt": 0}
        for sign, bound in (("≥", "Ge"), (">", "Gt")):
            match = re.match(sign + r" ([0-9.]+)", accepted)
            if match:
                assert bounds.get(bound) == float(match.group(1)), (key, accepted, bounds)
        match = re.match(r"([\[(])([0-9.]+), ([0-9.]+)([\])])", accepted)
        if match:
            low = "Ge" if match.group(1) == "[" else "Gt"
            high = "Le" if match.group(4) == "]" else "Lt"
            assert (bounds.get(low), bounds.get(high)) == (
                float(match.group(2)), float(match.group(3))), (key, accepted, bounds)
        match = re.match(r"([0-9]+) … ([0-9]+)$", accepted)
        if match:
            assert (bounds.get("Ge"), bounds.get("Le")) == (
                int(match.group(1)), int(match.group(2))), (key, accepted, bounds)
    return rows


def test_every_config_key_is_in_configuration_md_with_its_default_and_range():
    from consortia.config import RunConfig
    from consortia.tasks import TASKS

    rows = _check_key_table("configuration.md", dict(_leaves(RunConfig)))
    assert re.findall(r"`([^`]+)`", rows["task"][1]) == sorted(TASKS)


def test_every_site_toml_key_is_in_partners_md_with_its_default_and_range():
    from consortia.client.site_config import SiteConfig

    _check_key_table("partners.md", dict(_leaves(SiteConfig)))


def test_every_server_toml_key_is_in_operators_md_with_its_default_and_range():
    from consortia.server.deploy_config import ServerDeployConfig

    _check_key_table("operators.md", {k: f for k, f in _leaves(ServerDeployConfig)
                                      if k.startswith("server.")})


def test_the_python_version_readme_and_pyproject_state_is_one_the_dependencies_install_on():
    """README's "Python 3.N+" is pyproject's requires-python, and that is no older than what
    Flower (the dependency that asks the most) and the standard library modules we import
    (tomllib, 3.11) need: pip would otherwise install consortia and fail on flwr."""
    import tomllib
    from importlib.metadata import metadata

    root = DOCS.parent
    requires = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    ours = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())
    flower = re.search(r">=\s*(\d+)\.(\d+)", metadata("flwr")["Requires-Python"]).groups()
    assert ours >= (3, 11) and ours >= tuple(int(x) for x in flower)
    readme = re.search(r"Python (\d+)\.(\d+)\+", (root / "README.md").read_text()).groups()
    assert tuple(int(x) for x in readme) == ours


def _named_fields(doc: str, row_start: str) -> set[str]:
    """The `snake_case` names in the line of `doc` (relative to the repository) that starts
    with `row_start`."""
    text = (DOCS.parent / doc).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(row_start))
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", line))


def _check_console_api_fields(out, run_id: str) -> None:
    """operators.md's JSON API table: each field a route's row names is in its answer for
    the run in `out`'s store."""
    from fastapi.testclient import TestClient

    from consortia.server.console.app import create_app
    from consortia.server.console.auth import ConsoleToken
    from consortia.server.store.store import RunStore

    store = RunStore(out / "store.db", create=False)
    token = ConsoleToken(out / "console-token")
    headers = {"Authorization": f"Bearer {token.rotate()}"}
    client = TestClient(create_app(store, token))
    text = (DOCS / "operators.md").read_text()
    try:
        for route, path in (("`GET /api/runs`", "/api/runs"),
                            ("`GET /api/runs/{run}`", f"/api/runs/{run_id}"),
                            ("`GET /api/runs/{run}/rounds`", f"/api/runs/{run_id}/rounds"),
                            ("`GET /api/runs/{run}/clients`", f"/api/runs/{run_id}/clients"),
                            ("`GET /api/runs/{run}/checkpoints`", f"/api/runs/{run_id}/checkpoints"),
                            ("`GET /api/runs/{run}/audit?limit=N`", f"/api/runs/{run_id}/audit")):
            line = next(ln for ln in text.splitlines() if ln.startswith(f"| {route} |"))
            named = set(re.findall(r"`([a-z][a-z_]*)`", line.split(" | ", 1)[1]))
            answer = client.get(path, headers=headers)
            assert answer.status_code == 200, (path, answer.text)
            first = answer.json()[0] if isinstance(answer.json(), list) else answer.json()
            named -= {"rounds", "protocol", "operator", "limit"}  # words, not fields
            assert named <= first.keys(), (route, named - first.keys())
    finally:
        store.close()


@pytest.mark.slow
def test_the_output_fields_the_docs_name_are_the_ones_a_run_writes(tmp_path):
    """README's table of a run's files and secagg.md's metrics.jsonl fields, against a
    one-round run under secure aggregation."""
    import json

    from consortia.server.results import read_jsonl
    from consortia.simulations.runner import run_simulation

    cfg = load_config(DOCS.parent / "simulations" / "experiments" / "digits-dp-smoke.toml",
                      ["rounds=1", "clients=3", "clients_per_round=3", "secagg.enabled=true",
                       "train_examples=300", "test_examples=100"])
    summary = run_simulation(cfg, tmp_path)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    participation = read_jsonl(tmp_path / "participation.jsonl")[0]
    conditional = {"eval_every", "user_epsilon", "byzantine_clients", "train_loss"}  # other runs'

    assert _named_fields("README.md", "| `metrics.jsonl` |") - conditional <= row.keys()
    text = (DOCS / "secagg.md").read_text()
    start = text.index("`metrics.jsonl` records `secagg_status`")
    named = set(re.findall(r"`(secagg_[a-z_]+)`", text[start:text.index("\n- ", start)]))
    assert named - {"secagg_reason"} <= row.keys()  # secagg_reason: an aborted round's
    assert _named_fields("README.md", "| `summary.json` |") - conditional <= (
        summary.keys() | summary["clients"][0].keys())
    statuses = {"trained", "rejected", "failed"}
    assert _named_fields("README.md", "| `participation.jsonl` |") - statuses <= participation.keys()

    _check_console_api_fields(tmp_path, summary["run_id"])

    readme = (DOCS.parent / "README.md").read_text()
    table = readme[readme.index("Each run writes to `--out`:"):readme.index("## Documentation")]
    files = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert "run.json" in files and len(files) >= 8
    for name in files:
        assert (tmp_path / name.replace("<id>", "0")).exists(), name


def test_the_sweep_csv_columns_simulations_md_names_are_the_ones_written():
    from consortia.simulations.sweep import sweep_row

    text = (DOCS / "simulations.md").read_text()
    start = text.index("`results/sweep/sweep.csv` has one row per cell:")
    named = re.findall(r"`([a-z_]+)`", text[start:text.index("\n\n", start)])
    # run_sweep writes "cell" (the folder), then sweep_row's: the --grid keys, then these.
    written = ["cell"] + [k for k in sweep_row({}, {}) if k != "cell"]
    assert named == written


def _sim_commands():
    """(doc, config path, --set values, --grid specs) of every `consortia sim run` /
    `sim sweep` command in README.md and docs/ that names an example config."""
    for path in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # continued lines
        text = re.sub(r"\n\s*(?=--set )", " ", text)  # a command wrapped in prose
        # A command quoted in prose (`consortia sim run ...`) may be wrapped over lines.
        text = re.sub(r"`consortia sim [^`]*`", lambda m: re.sub(r"\s*\n\s*", " ", m[0]), text)
        for match in re.finditer(r"consortia sim (?:run|sweep) (\S+\.toml)([^`\n#|]*)", text):
            config, rest = match.groups()
            config = DOCS.parent / (config if "/" in config else f"simulations/experiments/{config}")
            if "..." in rest or config.name == "experiment.toml":
                continue  # a placeholder (`--set ...`, simulations.md's experiment.toml)
            yield (path.name, config, re.findall(r"--set[= ](\S+)", rest),
                   re.findall(r"--grid[= ](\S+)", rest))


def test_the_sim_commands_in_the_docs_load_and_set_nothing_inert():
    """Each command's config (each sweep cell's) passes the schema, and the command sets
    no key the run would call inert at start ('set but changing nothing in this run')."""
    import itertools

    from consortia.config import inert_settings_warning

    commands = list(_sim_commands())
    assert len(commands) > 30
    for doc, config, sets, grids in commands:
        keys = [g.split("=", 1)[0] for g in grids]
        values = [g.split("=", 1)[1].split(",") for g in grids]
        for cell in itertools.product(*values):
            overrides = sets + [f"{k}={v}" for k, v in zip(keys, cell, strict=True)]
            try:
                cfg = load_config(config, overrides)
            except ConfigError as err:
                raise AssertionError(f"{doc}: {config.name} {overrides}: {err}") from None
            assert inert_settings_warning(cfg) is None, (doc, config.name, overrides)


def test_every_repository_file_the_docs_name_exists():
    """A `folder/file.py` (or .toml, .md; `path::test` and `path:function` too) named in
    README.md or docs/, and every relative link, is a file of this repository."""
    root = DOCS.parent
    missing = []
    for path in [root / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        named = re.findall(r"`([A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+\.(?:py|toml|md))(?:[:`])", text)
        linked = re.findall(r"\]\(([A-Za-z0-9_./-]+)(?:#[^)]*)?\)", text)
        for name in named:
            if name.startswith("my_"):  # a partner's own file, in an example
                continue
            if not ((root / name).is_file() or (path.parent / name).is_file()):
                missing.append(f"{path.name}: {name}")
        for name in linked:
            if not (path.parent / name).exists():
                missing.append(f"{path.name}: link {name}")
    assert missing == []


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("how", ["FMNIST_DIR", "CONSORTIA_FASHION_MNIST_DIR"])
def test_make_demo_takes_your_own_fashion_mnist_copy_as_readme_says(tmp_path, how):
    """README: without the Debian package, give make your copy's folder (FMNIST_DIR=, or
    $CONSORTIA_FASHION_MNIST_DIR): make's data check and the demo run both read it. (Before,
    the check looked only at /usr/share/... and the run at the environment, so a copy
    given either way failed `make data` or was not what the demo read.)"""
    import os
    import subprocess

    copy = tmp_path / "my-fashion-mnist"
    env = {**os.environ, "CONSORTIA_FASHION_MNIST_DIR": str(copy)} if how != "FMNIST_DIR" else \
        {k: v for k, v in os.environ.items() if k != "CONSORTIA_FASHION_MNIST_DIR"}
    args = [f"FMNIST_DIR={copy}"] if how == "FMNIST_DIR" else []
    readme = (DOCS.parent / "README.md").read_text()
    assert f"`make demo {how}=" in readme or f"`{how}` set" in readme
    plan = subprocess.run(["make", "-n", "data", "demo", *args], cwd=DOCS.parent, env=env,
                          capture_output=True, text=True, check=True).stdout  # -n: runs nothing
    assert f"[ -f {copy}/train-images-idx3-ubyte.gz ]" in plan
    demo = next(line for line in plan.splitlines() if "consortia sim run" in line)
    assert f"CONSORTIA_FASHION_MNIST_DIR={copy} " in demo


def test_a_deployed_server_refuses_the_simulations_own_keys(tmp_path):
    """configuration.md: faults.* and sim.* but reply_timeout_s do nothing in a deployment
    and fail at start there, away from their defaults. (Before, operators.md's server.toml
    with run.faults.byzantine_fraction = 0.2 or run.sim.max_actors = 2 loaded, and the run
    recorded settings that changed nothing.)"""
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(toml_block("operators.md", "## server.toml"))
    assert load_server_config(server_toml).run.sim.reply_timeout_s == 600
    for key in ("run.faults.byzantine_fraction=0.2", "run.faults.dropout=0.1",
                "run.sim.max_actors=2", "run.sim.dispatch='flower'", "run.sim.poll_interval_s=0.1",
                "run.train_examples=1000", "run.partition.kind='dirichlet'",
                "run.partition.alpha=0.1"):
        with pytest.raises(ConfigError, match=re.escape(key.split("=")[0]) + ".* a deployed "
                           "server does not use"):
            load_server_config(server_toml, [key])
    # At their defaults they pass: a stored run's full config holds them all.
    assert load_server_config(server_toml, ["run.faults.dropout=0.0", "run.sim.dispatch='prompt'",
                                            "run.partition.kind='iid'"])
    natural = load_server_config(server_toml, ["run.task='shakespeare-smollm2-lora'",
                                               "run.partition.kind='natural'"])
    assert natural.run.partition.kind == "natural"


def test_server_start_says_rounds_between_evaluations(tmp_path, monkeypatch):
    """configuration.md: with eval_every > 1 the rows in between have no accuracy;
    operators.md: server start prints each round as it is recorded. It raised KeyError
    'accuracy' at the first such row (server/deploy.py wait_for_run), which ended the
    command in the middle of the run (fmnist-dp-distributed.toml evaluates every 50)."""
    from deploy_harness import server_start_lines

    rows = [{"round": 1, "clients_trained": 2, "clients_sampled": 2, "epsilon_max": 0.5},
            {"round": 2, "accuracy": 0.5, "loss": 1.0, "clients_trained": 2,
             "clients_sampled": 2, "epsilon_max": 0.7}]
    status, said = server_start_lines(monkeypatch, tmp_path, rows, {"site-a": 11, "site-b": 12})
    assert status == ("completed", "")
    assert [line for line in said if line.startswith("round")] == [
        "round 1: trained 2/2, ε max 0.500",
        "round 2: accuracy 0.5000, trained 2/2, ε max 0.700"]


def test_bench_sim_runs_our_runner_with_nothing_set_in_vain(monkeypatch):
    """results.md: `consortia bench sim` times our runner with its defaults. It set
    partition.min_samples = 1, which an IID partition never reads, so every run began with
    'set but changing nothing in this run: partition.min_samples = 1 ...'."""
    from consortia.config import inert_settings_warning
    from consortia.simulations import bench_sim

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        cfg = load_config(*args, **kwargs)
        raise Built(inert_settings_warning(cfg))

    monkeypatch.setattr(bench_sim, "load_config", built)
    with pytest.raises(Built) as said:  # before any simulation starts
        bench_sim.bench_sim(clients=1000, per_round=100, rounds=8)
    assert said.value.args[0] is None


def test_adaptive_clipping_keys_without_a_target_quantile_are_said_at_start():
    """configuration.md: user_dp.clip_lr and user_dp.count_noise serve adaptive clipping
    only (server/workflow.py passes count_noise on only with a target_quantile); set
    without one they changed nothing, and nothing said so."""
    from consortia.config import inert_settings_warning

    smoke = DOCS.parent / "simulations" / "experiments" / "digits-dp-smoke.toml"
    base = ["clients=10", "clients_per_round=10", "user_dp.enabled=true"]
    said = inert_settings_warning(load_config(smoke, base + ["user_dp.count_noise=2",
                                                             "user_dp.clip_lr=0.1"]))
    assert said is not None
    assert "user_dp.clip_lr = 0.1 (only adaptive clipping" in said
    assert "user_dp.count_noise = 2.0 (only adaptive clipping" in said
    adaptive = base + ["user_dp.count_noise=2", "user_dp.target_quantile=0.5"]
    assert inert_settings_warning(load_config(smoke, adaptive)) is None


@pytest.mark.parametrize("setting", ["privacy.enabled=false", "privacy.mode='distributed'"])
def test_physical_batch_size_outside_local_dp_is_said_at_start(setting):
    """configuration.md: physical_batch_size cuts local DP-SGD's batches (client/trainer.py
    passes it only there); without DP, or under distributed DP's one step a round, it ran
    silently as if it counted."""
    from consortia.config import inert_settings_warning

    experiments = DOCS.parent / "simulations" / "experiments"
    config = experiments / ("fmnist-dp-distributed-fast.toml" if "distributed" in setting
                            else "digits-dp-smoke.toml")
    said = inert_settings_warning(load_config(config, [setting, "physical_batch_size=16"]))
    assert said is not None and "physical_batch_size = 16 (only local DP-SGD" in said
    local = load_config(experiments / "digits-dp-smoke.toml", ["physical_batch_size=16"])
    assert inert_settings_warning(local) is None


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_clean_removes_what_make_built_and_keeps_the_runs():
    """`make clean` deleted results/ (every run's output, the demo's too) with the venv.
    It now removes what make built, our compiled VAES library included, and says results/
    is kept."""
    import subprocess

    plan = subprocess.run(["make", "-n", "clean"], cwd=DOCS.parent, capture_output=True,
                          text=True, check=True).stdout  # -n: runs nothing
    removal = next(line for line in plan.splitlines() if line.startswith("rm -rf"))
    removed = removal.split()[2:]
    assert {".venv", "build", "privacy/secagg/_aesctr*.so"} <= set(removed)
    assert "results" not in removed and "results/" not in removed
    assert "results/ kept (your runs)" in plan


def test_make_says_what_a_python_without_venv_lacks_on_every_try(tmp_path):
    """README: Debian's python3 needs python3-venv. Without it, `python3 -m venv` leaves a
    venv without pip and fails; the next `make` saw .venv/bin/python there, kept it, and
    failed with 'No module named pip', hiding what to install. Now a venv without pip is
    made again, so every try says what is missing. (A fake python stands for Debian's: it
    makes the venv without pip and fails as Debian's does; nothing is installed.)"""
    import os
    import subprocess
    import sys

    assert "`python3-venv`" in (DOCS.parent / "README.md").read_text()
    python = tmp_path / "debian-python3"
    python.write_text(f"""#!/bin/sh
if [ "$1 $2" = "-m venv" ]; then
  {sys.executable} -m venv --without-pip "$3"
  echo "ensurepip is not available: install the python3-venv package" >&2
  exit 1
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    for attempt in (1, 2):
        # A clean environment, as a fresh shell's: variables other tests of this process
        # set (Ray's, for one) must not reach the venv's python.
        done = subprocess.run(["make", "install", f"VENV={tmp_path / 'venv'}", f"PYTHON={python}"],
                              cwd=DOCS.parent, capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")})
        assert done.returncode != 0
        assert "install the python3-venv package" in done.stderr, (attempt, done.stderr)
        assert "No module named pip" not in done.stderr
