"""Registering, listing and removing backends; importing an existing tree as nodes."""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

import yaml

from core import config
from core.errors import ConfigError
from core.journal import records
from core.model import Backend, Principal
from core.observe.progress import Callback, Meter
from core.rollups import counters, totals
from core.storage import store
from core.storage.db import Database
from executors.base import ExecutorError, Stat
from executors.local import LIST_PAGE, LocalExecutor

_IMPORT_BATCH = 2000
log = logging.getLogger(__name__)


# Options of an S3 backend (backend_mounts.options) and the executor arguments they set.
S3_OPTIONS = ("endpoint_url", "region", "part_size", "multipart_threshold", "copy_threshold", "cache_bytes",
              "chunk_size", "readahead", "workers", "max_attempts")


def make_executor(backend: Backend, home: Path | None = None, *, read_only: bool | None = None):
    read_only = backend.read_only if read_only is None else read_only
    if backend.kind == "local":
        return LocalExecutor(backend.root, read_only=read_only)
    if backend.kind == "s3":
        from executors.s3 import S3Executor

        # Spool (content being written) and read cache live under FILESTORE_HOME, per backend.
        base = (home or config.load().home) / "s3" / backend.name
        opts = {k: v for k, v in (backend.options or {}).items() if k in S3_OPTIONS and v is not None}
        env_cache = os.environ.get("FILESTORE_S3_CACHE_BYTES")
        if env_cache and "cache_bytes" not in opts:
            opts["cache_bytes"] = int(env_cache)
        opts.setdefault("region", os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"))
        try:
            return S3Executor(backend.root, spool_dir=base / "spool", cache_dir=base / "cache",
                              read_only=read_only, **opts)
        except ExecutorError as exc:
            raise ConfigError(f"backend {backend.name}: {backend.root}: {exc}") from exc
    raise ConfigError(f"backend {backend.name}: kind {backend.kind!r} is not supported")


def exists(db: Database, name: str) -> bool:
    return bool(db.query("SELECT 1 FROM filestore.backend_mounts WHERE name = %s AND state = 'active'", (name,)))


def list_backends(db: Database) -> list[Backend]:
    return store.load_backends(db)


def add(db: Database, name: str, root: str, *, read_only: bool = False, who: Principal | None = None,
        progress: Callback | None = None, options: dict | None = None,
        home: Path | None = None) -> Backend:
    """Register a local directory or an S3 prefix (`s3://bucket/prefix`) and import what it
    already holds, as one journaled command. The import commits directory by directory; if it
    is cut off (S3 failing, a crash), the same command again resumes it where it stopped.
    `progress`: core.observe.progress Steps, entries imported of the tree's total (_ImportCount)."""
    who = who or Principal.current_process()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if root.startswith("s3://"):
        from executors.s3 import parse_root

        try:
            bucket, prefix = parse_root(root)
        except ExecutorError as exc:
            raise ConfigError(str(exc)) from exc
        root, kind = f"s3://{bucket}/{prefix}".rstrip("/"), "s3"
    else:
        path = Path(root).expanduser().absolute()
        if not path.is_dir():
            raise ConfigError(f"backend root {path} is not a directory")
        root, kind = str(path), "local"
    found = db.query("SELECT root, options ? 'import' FROM filestore.backend_mounts"
                     " WHERE name = %s AND state = 'active'", (name,))
    if found and not found[0][1]:
        raise ConfigError(f"backend {name!r} already exists")
    if found and found[0][0] != root:
        raise ConfigError(f"backend {name!r} is being imported from {found[0][0]}: run the same command to "
                          f"resume, or `filestore backend remove {name}`")
    if kind == "s3":
        executor = make_executor(Backend(0, name, "s3", root, True, 0, options), home, read_only=True)
    else:
        executor = LocalExecutor(root, read_only=True)  # importing only reads
    try:
        return _register(db, name, kind, root, read_only, options, executor, who, progress)
    except ExecutorError as exc:
        raise ConfigError(f"backend {name}: importing {root} stopped ({exc}); run the same command to resume")\
            from exc
    finally:
        executor.close()


def _register(db, name, kind, root, read_only, options, executor, who, progress) -> Backend:
    """The backend row and its root node first, with the import's to-do list (directories not
    listed yet) in options.import; then one transaction per batch of directories, each moving
    the to-do list on; then the journal row, which also clears the to-do list. A backend with
    an import under way is not mounted."""
    row = db.query("SELECT id, root_node_id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                   (name,))
    if row:
        backend_id, root_id = row[0]
    else:
        root_stat = executor.stat(b"")
        with db.pool.connection() as conn, conn.transaction():
            root_id = _new_ids(conn, 1)[0]
            todo = {"import": {"pending": [[root_id, "", False]], "links": {}}}
            backend_id = conn.execute(
                "INSERT INTO filestore.backend_mounts (name, kind, root, read_only, options, root_node_id)"
                " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (name, kind, root, read_only, json.dumps({**options, **todo}), root_id)).fetchone()[0]
            _flush(conn, [_node_row(root_id, backend_id, root_stat)], [])
    count = _ImportCount(db, backend_id, executor, progress, resumed=bool(row))
    try:
        _import_tree(db, backend_id, executor, count.listed)
    finally:
        count.stop()
    count.meter.note("rollups and counters of the imported tree")
    with db.pool.connection() as conn, conn.transaction():
        conn.execute("UPDATE filestore.backend_mounts SET options = options - 'import' WHERE id = %s", (backend_id,))
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE kind <> 'dir'), count(*) FILTER (WHERE kind = 'dir') - 1,"
            " coalesce(sum(size) FILTER (WHERE kind = 'file'), 0) FROM filestore.nodes WHERE backend_id = %s",
            (backend_id,)).fetchone()
        # Imported nodes have no snapshots for the counters to fold: count them here, once.
        conn.execute(
            "INSERT INTO filestore.counters AS c (scope, scope_key, counter, value)"
            " SELECT s.scope, s.scope_key, 'nodes.' || n.kind, count(*) FROM filestore.nodes n,"
            " (VALUES ('global', ''), ('backend', %s)) AS s(scope, scope_key)"
            " WHERE n.backend_id = %s AND n.id <> %s GROUP BY 1, 2, 3"
            " ON CONFLICT (scope, scope_key, counter) DO UPDATE SET value = c.value + excluded.value",
            (name, backend_id, root_id))
        counters.seed_backend(conn, root_id)  # and below each directory of the tree
        journal_id = records.record_in(conn, [records.Record(records.Journal(
            "backend.add", "committed", who, uuid.uuid4(), backend_id, root_id, "",
            {"name": name, "root": root, "read_only": read_only, **({"options": options} if options else {})},
            result={"imported_entries": counts[0], "imported_dirs": counts[1],
                    "imported_bytes": int(counts[2])}))])[0][1]
    log.info("backend %s added at %s: %d entries imported", name, root, counts[0] + counts[1],
             extra={"journal_id": journal_id, "backend": name})
    totals.recalculate(db, root_id, who, reason="import")  # the imported tree's rollups, set-based
    count.meter.finish()
    return Backend(backend_id, name, kind, root, read_only, root_id, options)


def _new_ids(conn, n: int) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT nextval('filestore.node_ids') FROM generate_series(1, %s)", (n,)).fetchall()]


class _ImportCount:
    """Where an import stands (issue 17): entries imported, by this run and by the runs it
    resumes, of the tree's total. The executor counts the tree in a background thread
    (`count_tree`: a scandir walk, a LIST without delimiter); until that count is in, or with
    an executor that has none, the total is estimated ("about") as the entries imported plus
    the directories still to list times the entries per directory listed so far."""

    def __init__(self, db: Database, backend_id: int, executor, progress: Callback | None, *, resumed: bool):
        # What earlier runs committed (0.2-0.4 s with 800,000 entries in the database): asked only on a resume.
        base = db.query("SELECT count(*) FROM filestore.entries e JOIN filestore.nodes n ON n.id = e.parent_id"
                        " WHERE n.backend_id = %s", (backend_id,))[0][0] if progress and resumed else 0
        self.meter = Meter(progress, "imported entries", base=base)
        self.dirs = self.entries = 0
        self.counted: int | None = None
        self._stop = threading.Event()
        self._thread = None
        if progress is not None and hasattr(executor, "count_tree"):
            self._thread = threading.Thread(target=self._count, args=(executor,), name="import-count", daemon=True)
            self._thread.start()

    def _count(self, executor) -> None:
        try:
            self.counted = executor.count_tree(self._stop)
        except (ExecutorError, OSError) as exc:  # the import itself reports what fails; this stays an estimate
            log.debug("import count failed: %s", exc)

    def listed(self, dirs: int, entries: int, pending: int) -> None:
        """_import_tree's callback after each batch: directories it finished listing and entries
        it committed, directories left (one partly listed among them when a batch ended within
        a directory; before any directory is done, each left is guessed at the entries so far)."""
        self.dirs += dirs
        self.entries += entries
        done = self.meter.base + self.entries
        note = f"{pending:,} director{'y' if pending == 1 else 'ies'} to list" if pending else ""
        if self.counted is not None:
            self.meter.update(done, max(self.counted, done), note=note)
        else:
            self.meter.update(done, done + round(pending * self.entries / max(self.dirs, 1)), estimated=True,
                              note=note)

    def stop(self) -> None:
        self._stop.set()


def _batch_size() -> int:
    """Entries a transaction of the import commits: _IMPORT_BATCH, or FILESTORE_IMPORT_BATCH
    (tests make it small to cut an import between two given entries)."""
    return max(int(os.environ.get("FILESTORE_IMPORT_BATCH") or _IMPORT_BATCH), 1)


def _import_tree(db: Database, backend_id: int, executor, progress) -> None:
    """Depth-first through the to-do list, each directory read a page at a time
    (executor.listdir_pages, outside any transaction): whenever about a batch of entries has
    accumulated (_batch_size), also in the middle of a directory, they are committed in one
    transaction with the to-do list that follows, so a cut-off import loses at most one batch
    and holds at most a batch of rows, a page and the to-do list.

    The to-do list (options.import.pending) is [directory node id, path hex, partial]: a
    partial directory has some of its entries committed already, and is listed again with
    those names skipped before their stat (one query a page); the subdirectories among them
    are on the to-do list already, put there by the batch that committed them. ([id, hex], an
    import begun before pages, is a directory not begun.) With it, options.import.links: the
    hard links met whose other names are still to come, inode -> [node id, names to come], so
    that the names of a file on either side of a cut are still one node; a group is dropped
    once its st_nlink names are in."""
    state = db.query("SELECT options->'import' FROM filestore.backend_mounts WHERE id = %s", (backend_id,))[0][0]
    pending = [(item[0], bytes.fromhex(item[1]), bool(item[2:] and item[2])) for item in state["pending"]]
    links: dict[int, list[int]] = {int(ino): group for ino, group in (state.get("links") or {}).items()}
    batch = _batch_size()
    page_size = min(LIST_PAGE, batch)
    node_rows: list[tuple] = []
    entry_rows: list[tuple] = []
    listed_dirs = 0  # directories whose last page is in, since the last commit

    def commit(todo: list[tuple[int, bytes, bool]]) -> None:
        nonlocal listed_dirs
        entries = len(entry_rows)
        with db.pool.connection() as conn, conn.transaction():
            _flush(conn, node_rows, entry_rows)
            conn.execute(
                "UPDATE filestore.backend_mounts SET options = jsonb_set(jsonb_set(options, '{import,pending}', %s),"
                " '{import,links}', %s) WHERE id = %s",
                (json.dumps([[i, r.hex(), p] for i, r, p in todo]),
                 json.dumps({str(ino): group for ino, group in links.items()}), backend_id))
        if progress:
            progress(listed_dirs, entries, len(todo))
        listed_dirs = 0

    while pending:
        dir_id, rel, partial = pending.pop()
        found: list[tuple[int, bytes, bool]] = []  # its subdirectories met so far
        skip = (lambda names, dir_id=dir_id: _imported(db, dir_id, names)) if partial else None
        for page in executor.listdir_pages(rel, skip, page_size):
            if len(entry_rows) >= batch:  # mid-directory: this one goes on the list as partial
                commit(pending + found + [(dir_id, rel, True)])
            ids = iter(_new_ids_outside(db, len(page)) if page else ())
            for name, st in page:
                if st.kind != "dir" and st.nlink > 1:  # hard links: one node with several names
                    group = links.get(st.ino)
                    if group is not None:
                        entry_rows.append((dir_id, name, group[0], False))
                        group[1] -= 1
                        if group[1] <= 0:
                            del links[st.ino]
                        continue
                node_id = next(ids)
                if st.kind != "dir" and st.nlink > 1:
                    links[st.ino] = [node_id, st.nlink - 1]
                node_rows.append(_node_row(node_id, backend_id, st))
                entry_rows.append((dir_id, name, node_id, st.kind == "dir"))
                if st.kind == "dir":
                    found.append((node_id, rel + b"/" + name if rel else name, False))
        pending.extend(found)
        listed_dirs += 1
        if len(entry_rows) >= batch:
            commit(pending)
    commit(pending)


def _imported(db: Database, dir_id: int, names: list[bytes]) -> set[bytes]:
    """Which of `names` a partly imported directory has already (a resumed import skips them)."""
    return {bytes(r[0]) for r in db.query(
        "SELECT name FROM filestore.entries WHERE parent_id = %s AND name = ANY(%s)", (dir_id, names))}


def _new_ids_outside(db: Database, n: int) -> list[int]:
    """Node ids for a page of entries, drawn before its batch's transaction (a sequence is not
    transactional: ids of a batch never committed are only skipped)."""
    return [r[0] for r in db.query("SELECT nextval('filestore.node_ids') FROM generate_series(1, %s)", (n,))]


def _node_row(node_id: int, backend_id: int, st: Stat) -> tuple:
    return (node_id, backend_id, st.kind, st.size if st.kind != "dir" else 0, st.mode, st.uid, st.gid,
            st.rdev, st.atime_ns, st.mtime_ns, st.ctime_ns, st.target, st.checksum)


def _flush(conn, node_rows: list, entry_rows: list) -> None:
    with conn.cursor() as cur:
        if node_rows:
            cur.executemany(
                "INSERT INTO filestore.nodes (id, backend_id, kind, size, mode, uid, gid, rdev, atime_ns,"
                " mtime_ns, ctime_ns, symlink_target, checksum)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                node_rows)
        if entry_rows:
            cur.executemany("INSERT INTO filestore.entries (parent_id, name, node_id, is_dir) VALUES (%s, %s, %s, %s)",
                            entry_rows)
    node_rows.clear()
    entry_rows.clear()


def remove(db: Database, name: str, who: Principal | None = None) -> None:
    """Stop tracking a backend. Its files stay on disk; its nodes and journal stay for history."""
    who = who or Principal.current_process()
    rows = db.query("SELECT id, root_node_id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                    (name,))
    if not rows:
        raise ConfigError(f"no backend named {name!r}")
    backend_id, root_id = rows[0]
    with db.pool.connection() as conn, conn.transaction():
        # The name is freed for a new backend; the removed one keeps a unique, recognisable name.
        conn.execute("UPDATE filestore.backend_mounts SET state = 'removed', name = left(name, 40) || '.removed-' || id"
                     " WHERE id = %s", (backend_id,))
        records.record_in(conn, [records.Record(records.Journal("backend.remove", "committed", who, uuid.uuid4(),
                                                                backend_id, root_id, "", {"name": name}))])


def load_config_file(path: Path) -> list[dict]:
    """FILESTORE_BACKENDS_PATH: a YAML or JSON list of {name, path, read_only}, or {backends: [...]}."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read FILESTORE_BACKENDS_PATH {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML or JSON: {first}") from exc
    if isinstance(data, dict):
        data = data.get("backends", [])
    if not isinstance(data, list) or not all(isinstance(b, dict) and "name" in b for b in data):
        raise ConfigError(f"{path}: expected a list of backends, each with a name and a path")
    return data


def apply_config_file(db: Database, path: Path) -> list[str]:
    """Add the declared backends that are not registered yet; returns the names added."""
    added = []
    existing = {b.name for b in list_backends(db) if "import" not in (b.options or {})}  # cut off: resumed
    for spec in load_config_file(path):
        if spec["name"] in existing:
            continue
        root = spec.get("path") or spec.get("root")
        if not root:
            raise ConfigError(f"{path}: backend {spec['name']!r} has no path")
        add(db, spec["name"], str(root), read_only=bool(spec.get("read_only", False)),
            who=Principal.current_process("config"),
            options={**{k: spec[k] for k in S3_OPTIONS if k in spec},
                     **({"xattrs": True} if spec.get("xattrs") else {}),
                     **({"observe_only": True} if spec.get("observe_only") else {})})
        added.append(spec["name"])
    return added

