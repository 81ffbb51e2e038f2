"""Per-process worker state: settings, one database engine, the device, the worker's name."""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.objectstore import BlobCache, Store
from core.settings import Settings, get_settings
from workers.engine.types import fast_bf16, strict_fp32
from workers.sandbox.config import config_from_settings, probe
from workers.sandbox.jail import Jail


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    device: torch.device
    name: str
    _jail: Jail | None = field(default=None, repr=False, compare=False)
    _cache: BlobCache | None = field(default=None, repr=False, compare=False)

    @property
    def store(self) -> Store:
        return self.settings.store()

    def fetch(self, key: str, sha256: str | None) -> Path:
        """A checkpoint's or dataset's local file: in place where the store is a local
        folder, else from this worker's cache (fetched and verified by content hash)."""
        if self._cache is None:
            self._cache = BlobCache(self.settings.data_dir / "cache",
                                    self.settings.cache_bytes)
        return self._cache.path(self.store, key, sha256)

    def jail(self) -> Jail:
        """The sandbox this worker runs models in (built once, checked when built)."""
        if self._jail is None:
            config = config_from_settings(self.settings, gpu=self.device.type == "cuda")
            probe(config)
            self._jail = Jail(config, prewarm=self.settings.sandbox_prewarm)
            weakref.finalize(self, self._jail.close)
        return self._jail

    @property
    def bf16_search(self) -> bool:
        """Whether attacks search under bf16 autocast: the ``precision`` setting, where
        ``auto`` means wherever bf16 is measurably faster (:func:`fast_bf16`). Attacks confirm
        each break in fp32 before they stop on it and the runner confirms it again
        (tests/engine/test_attack_bf16.py); accuracies are always measured in fp32."""
        if self.settings.precision == "auto":
            return fast_bf16(self.device)
        return self.settings.precision == "bf16"

    def describe_device(self) -> str:
        search = "bf16" if self.bf16_search else "fp32"
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {search} search)"
        return f"cpu ({torch.get_num_threads()} threads, {search} search)"


def pick_device(setting: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if setting == "auto" else setting)
    if device.type == "cuda":
        strict_fp32()  # references and accuracies in IEEE fp32 (the search may use bf16)
    return device


@lru_cache
def _runtime(pid: int) -> Runtime:
    settings = get_settings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    engine = make_engine(settings.database_url)
    return Runtime(settings=settings, engine=engine, sessions=make_sessionmaker(engine),
                   device=pick_device(settings.device),
                   name=settings.worker_name or f"{socket.gethostname()}:{pid}")


def runtime() -> Runtime:
    """The runtime of this process; a forked child builds its own engine (pid in the key)."""
    return _runtime(os.getpid())
