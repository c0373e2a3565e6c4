"""The client SDK: the ClientApp, the local trainer, the site."""

from consortia.client.client_app import build_client_app
from consortia.client.site import Site, SitePrivacy
from consortia.client.trainer import LocalTrainer

__all__ = ["LocalTrainer", "Site", "SitePrivacy", "build_client_app"]
