"""The ClientApp a deployed run's app bundle names (`consortia.client.deployed:app`).

`consortia client join` does not load it from the bundle: it builds the same ClientApp
from the installed package itself (client/runtime.py). This module exists so that a
SuperNode run the plain Flower way (`flower-supernode --node-config
'site-config="/path/site.toml"'`) finds the consortia ClientApp too; such a node runs what
the bundle names, which is why `join` is the supported way.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context

from consortia.client.client_app import build_client_app
from consortia.client.join import build_site
from consortia.client.site import Site
from consortia.client.site_config import load_site_config


@lru_cache(maxsize=1)
def _site(path: str) -> Site:
    return build_site(load_site_config(path))


def load_site(context: Context) -> Site:
    return _site(str(context.node_config["site-config"]))


app = build_client_app(load_site)
