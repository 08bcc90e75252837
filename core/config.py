"""Configuration from the environment, with defaults that need nothing installed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _default_home() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "filestore"


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str | None  # None: the embedded server in home/pg
    redis_url: str  # "inline": in-process maps and queues, no Redis
    backends_path: Path | None
    event_channel: str
    log_json: bool
    recursive_dir_sizes: bool = True  # a directory's st_size is its rollup (FILESTORE_DIR_SIZES=plain: 4096)
    # Extended attributes: "auto" (on for the backends added with --xattrs, off for a mount with
    # none), "on" (every backend) or "off" (none). Off, the kernel stops asking (ENOSYS) and
    # `ls -l` costs no round trip per entry (docs/architecture.md D38).
    xattrs: str = "auto"
    # What the mount's namespace (nodes, names, listings) may hold in memory, in bytes
    # (FILESTORE_NAMESPACE_MEMORY, with KiB/MiB/GiB suffixes): past it, what was used least
    # recently is dropped and loaded again when needed (core.view.namespace).
    namespace_memory: int = 512 << 20

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pgdata(self) -> Path:
        return self.home / "pg"

    @property
    def intents_path(self) -> Path:
        return self.home / "intents.log"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.staging_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)


def load(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = Path(env.get("FILESTORE_HOME") or _default_home()).expanduser().absolute()
    backends = env.get("FILESTORE_BACKENDS_PATH")
    return Settings(
        home=home,
        database_url=env.get("DATABASE_URL") or None,
        redis_url=env.get("REDIS_URL") or "inline",
        backends_path=Path(backends) if backends else None,
        event_channel=env.get("FILESTORE_EVENT_CHANNEL") or "apphub:filestore",
        log_json=(env.get("FILESTORE_LOG_FORMAT", "").lower() == "json"),
        recursive_dir_sizes=(env.get("FILESTORE_DIR_SIZES", "recursive").lower() != "plain"),
        xattrs=_switch(env.get("FILESTORE_XATTRS", "auto")),
        namespace_memory=parse_bytes(env.get("FILESTORE_NAMESPACE_MEMORY") or "512MiB", "FILESTORE_NAMESPACE_MEMORY"),
    )


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_bytes(value: str, name: str = "size") -> int:
    """`512MiB`, `2G`, `1500000`: a number of bytes (binary units for K/M/G and KiB/MiB/GiB)."""
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1
    if amount < 0 or unit not in _UNITS:
        from core.errors import ConfigError
        raise ConfigError(f"{name}: not a size: {value!r} (e.g. 512MiB, 2GiB)")
    return int(amount * _UNITS[unit])


def _switch(value: str) -> str:
    value = value.strip().lower()
    if value in ("on", "1", "yes", "true"):
        return "on"
    if value in ("off", "0", "no", "false"):
        return "off"
    return "auto"
