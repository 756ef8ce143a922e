"""A real PostgreSQL (Debian's package) in a temporary folder on a free loopback port.

``postgres`` fixture: one cluster for the test session, made with ``initdb`` and started with
``pg_ctl`` (as the ``postgres`` user when the tests run as root: PostgreSQL refuses root).
``pg_dsn``: a fresh, empty database in it for one test. The cluster can be stopped, killed
and started again on the same port and data folder (:meth:`Cluster.restart`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.rig.ports import free_port, wait_for_port


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for version in ("17", "16", "15", "14", "13"):
        p = Path(f"/usr/lib/postgresql/{version}/bin/{name}")
        if p.exists():
            return str(p)
    pytest.fail(f"{name} is not installed (apt-get install postgresql); scripts/setup --test installs it")


@dataclass
class Cluster:
    root: Path
    port: int
    user: str | None                      # the OS user PostgreSQL runs as (None: this one)
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=keygate"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), user=self.user, check=check, capture_output=True, text=True, timeout=60,
                              cwd=self.root)

    def start(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", "30", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                  "-c fsync=off -c full_page_writes=off -c max_connections=200", "start", check=False)
        if not (self.data_dir / "postmaster.pid").exists():
            raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
        wait_for_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once: a crash, not a shutdown (the next start
        recovers from the WAL). Waits until they are gone, so the next start finds the folder free."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        postmaster = int(pid_file.read_text().split()[0])
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids):
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not die")
            time.sleep(0.02)
        # A killed postmaster may linger as a zombie (its parent, pid 1 here, need not reap it), which
        # the next start would take for a live one: the lock file of a dead server is stale.
        pid_file.unlink()

    def restart(self) -> None:
        self.stop()
        self.start()

    def new_database(self) -> str:
        name = f"kg_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} OWNER keygate")
        return self.dsn(name)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        done = subprocess.run([_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "keygate", "-d", dbname,
                               "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], capture_output=True, text=True, timeout=30,
                              check=True)
        return done.stdout


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def start_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="keygate-pg-"))
    user = None
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    root.chmod(0o700)
    cluster = Cluster(root=root, port=free_port(), user=user)
    cluster._run(_bin("initdb"), "-D", str(cluster.data_dir), "-U", "keygate", "-A", "trust", "-E", "UTF8",
                 "--no-instructions")
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres: Cluster) -> str:
    if not (postgres.data_dir / "postmaster.pid").exists():  # a test before stopped it
        postgres.start()
    return postgres.new_database()
