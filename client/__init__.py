"""The client SDK: the ClientApp, the local trainer, the site, and the partner's API."""

from consortia.client.api import join_federation, site_status
from consortia.client.client_app import build_client_app
from consortia.client.policy import AuditLog, SitePolicy
from consortia.client.site import Site, SitePrivacy
from consortia.client.site_config import SiteConfig, load_site_config
from consortia.client.trainer import LocalTrainer

__all__ = ["AuditLog", "LocalTrainer", "Site", "SiteConfig", "SitePolicy", "SitePrivacy",
           "build_client_app", "join_federation", "load_site_config", "site_status"]
