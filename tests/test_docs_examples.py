"""The configuration examples in docs/ load, and agree with one another."""

import re
from pathlib import Path

from consortia.client.site_config import load_site_config
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
