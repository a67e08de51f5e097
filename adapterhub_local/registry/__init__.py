"""Storage layer: every byte on disk — bases, adapter versions, tags, the index."""

from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.cards import AdapterCard, CardInfo
from adapterhub_local.registry.store import LoadedAdapter, Registry

__all__ = ["AdapterCard", "BaseRecord", "CardInfo", "LoadedAdapter", "Registry"]
