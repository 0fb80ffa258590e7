"""The team stack on one machine: mlflow server and annotations on PostgreSQL, Celery jobs on Redis, gunicorn app.

    $ python -m vis team --workers 4 --port 8050        # or: make team
    >>> from vis.team import TeamConfig, TeamStack
    >>> with TeamStack(TeamConfig(workspace=ws, port=0, mlflow_port=0)) as stack:   # 0: a free port
    ...     stack.app_url, stack.mlflow_url, stack.database_url

What it starts, in order, each bound to 127.0.0.1 and waited for until healthy (docs/TEAM.md):
1. PostgreSQL databases `conceptlens` (annotations) and `conceptlens_mlflow` (tracking), created when missing on
   the server of `--postgres` (the machine's own; `make services` starts it). Redis must answer at `--redis`.
2. `mlflow server` on the tracking database, artifacts served from `<workspace>/team-mlartifacts`; health: /health.
3. With `--prepare`: the demo pipeline against that server (build the data if missing, fit — reused when the
   server already holds the model —, extract the store when it is missing or of another model, cache its maps).
4. The annotation database is migrated once (before any worker opens it) and the demo accounts are made
   (`python -m store users demo`: <workspace>/demo-accounts.txt).
5. A Celery worker for the app's background jobs (Redis broker and result backend); health: a ping by its name.
6. The app under gunicorn (`--workers` processes × `--threads` threads); health: /health.
Then it prints the URLs and waits; Ctrl-C or SIGTERM stops everything it started (app first, mlflow last), and so
does any of the processes dying (its log tail is printed). Logs: <workspace>/team-logs/<name>.log.

Every process gets the same configuration through the environment (README, "The workspace"): MLFLOW_TRACKING_URI,
CONCEPTLENS_DATABASE_URL, CONCEPTLENS_CACHE_URL; `--store`, `--dataset`, `--model` become CONCEPTLENS_STORE,
CONCEPTLENS_DATASET, CONCEPTLENS_MODEL, which the gunicorn app (`vis.app:create_server()`) and the Celery worker
(`python -m vis worker`) both read through `vis.app.app_config_from_env`, so jobs run against the same store and
model as the pages.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TeamConfig", "TeamStack", "TeamError", "team_main", "gunicorn_command", "ensure_database",
           "worker_command"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
WORKER_NAME = "conceptlens-team"


class TeamError(RuntimeError):
    """A service of the team stack is missing or did not become healthy; the message says which and why."""


@dataclass(frozen=True)
class TeamConfig:
    """Where the stack runs. Ports of 0 pick free ones (tests); URLs name the machine's PostgreSQL and Redis."""

    workspace: Path | None = None  # default: CONCEPTLENS_WORKSPACE or ./workspace
    host: str = "127.0.0.1"
    port: int = 8050
    mlflow_port: int = 5000
    workers: int = 2
    threads: int = 4
    postgres: str = DEFAULT_POSTGRES  # any database of the server: used to create the two below
    database: str = "conceptlens"
    mlflow_database: str = "conceptlens_mlflow"
    redis: str = DEFAULT_REDIS
    worker_concurrency: int = 1
    store: str | None = None  # None: the app's defaults (AppConfig)
    dataset: str | None = None
    model: str | None = None
    prepare: bool = False
    demo_accounts: bool = True
    timeout: float = 180.0  # seconds each service may take to become healthy
    extra_env: dict = field(default_factory=dict)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _pg_url(base: str, database: str, *, driver: str = "postgresql+psycopg") -> str:
    from sqlalchemy.engine import make_url

    return make_url(base).set(drivername=driver, database=database).render_as_string(hide_password=False)


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the PostgreSQL server of `server_url` unless it exists; returns its URL."""
    import psycopg
    from psycopg import sql

    admin = _pg_url(server_url, "postgres", driver="postgresql")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except psycopg.errors.DuplicateDatabase:
                    pass  # created by another launcher just now
    except psycopg.OperationalError as e:
        raise TeamError(f"PostgreSQL at {_shown(admin)} refuses connections ({str(e).strip()}); start it with "
                        f"`make services`") from None
    return _pg_url(server_url, name)


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as e:
        raise TeamError(f"Redis at {url} does not answer ({e}); start it with `make services`") from None


def gunicorn_command(*, bind: str, workers: int = 2, threads: int = 4, timeout: int = 120) -> list[str]:
    """The gunicorn command line of the app (threads > 1: the gthread worker, so one slow page load does not block
    a worker's other users)."""
    cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", bind, "--timeout", str(timeout),
           "--graceful-timeout", "20"]
    if threads > 1:
        cmd += ["--worker-class", "gthread", "--threads", str(threads)]
    return cmd + ["vis.app:create_server()"]


def worker_command(*, concurrency: int = 1, hostname: str) -> list[str]:
    """The command line of the stack's Celery worker: the app's one worker entry, with a node name to ping."""
    return [sys.executable, "-m", "vis", "worker", "--concurrency", str(concurrency), "--hostname", hostname]


class _Proc:
    """One child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict, log_dir: Path):
        self.name, self.argv = name, argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "a")
        self._log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:  # its children (gunicorn workers, celery pool) may outlive a crashed parent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


class TeamStack:
    """Start the team stack (see the module docstring); a context manager that stops it on exit."""

    def __init__(self, config: TeamConfig, *, out=None):
        from store.settings import load_settings

        self.config = config
        self.out = out if out is not None else sys.stdout
        host = config.host
        self.port = config.port or _free_port(host)
        self.mlflow_port = config.mlflow_port or _free_port(host)
        self.app_url = f"http://{host}:{self.port}"
        self.mlflow_url = f"http://{host}:{self.mlflow_port}"
        base = load_settings(config.workspace)
        self.workspace = base.workspace
        self.log_dir = self.workspace / "team-logs"
        self.artifacts = self.workspace / "team-mlartifacts"
        self.database_url = ""
        self.tracking_backend = ""
        self.procs: list[_Proc] = []

    # -- environment -----------------------------------------------------------------------------------------------
    def env(self) -> dict:
        """The environment every process of the stack gets: the team configuration, one thread per BLAS pool."""
        c = self.config
        env = {**os.environ, "CONCEPTLENS_WORKSPACE": str(self.workspace), "MLFLOW_TRACKING_URI": self.mlflow_url,
               "CONCEPTLENS_DATABASE_URL": self.database_url, "CONCEPTLENS_CACHE_URL": c.redis,
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
        for key, value in (("STORE", c.store), ("DATASET", c.dataset), ("MODEL", c.model)):
            if value:
                env[f"CONCEPTLENS_{key}"] = value
        env.update(c.extra_env)
        return env

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- start -------------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TeamStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        c = self.config
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        for name, port in (("app", self.port), ("mlflow", self.mlflow_port)):
            if _port_taken(c.host, port):
                raise TeamError(f"port {port} on {c.host} ({name}) is in use; choose another "
                                f"({'--port' if name == 'app' else '--mlflow-port'})")
        self.database_url = ensure_database(c.postgres, c.database)
        self.tracking_backend = ensure_database(c.postgres, c.mlflow_database)
        _check_redis(c.redis)
        env = self.env()

        self.artifacts.mkdir(exist_ok=True)
        mlflow = self._spawn("mlflow", [str(Path(sys.executable).with_name("mlflow")), "server",
                                        "--backend-store-uri", self.tracking_backend,
                                        "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
                                        "--host", c.host, "--port", str(self.mlflow_port), "--workers", "1"],
                             {**env, "MLFLOW_TRACKING_URI": ""})
        self._wait(mlflow, lambda: _http_ok(self.mlflow_url + "/health"), "the mlflow server")
        if c.prepare:
            self.prepare(env)
        self._migrate(env)
        worker = self._spawn("worker", worker_command(concurrency=c.worker_concurrency,
                                                      hostname=self._worker_name()), env)
        self._wait(worker, self._worker_ready, "the Celery worker")
        app = self._spawn("app", gunicorn_command(bind=f"{c.host}:{self.port}", workers=c.workers,
                                                  threads=c.threads), env)
        self._wait(app, lambda: _http_ok(self.app_url + "/health"), "the app (gunicorn)")

    def _worker_name(self) -> str:
        return f"{WORKER_NAME}-{self.port}@{socket.gethostname()}"

    def _worker_ready(self) -> bool:
        from celery import Celery

        probe = Celery("conceptlens-probe", broker=self.config.redis)
        try:
            return bool(probe.control.ping(destination=[self._worker_name()], timeout=1.0))
        except Exception:  # noqa: BLE001 — the broker connection itself may not be up yet: try again
            return False
        finally:
            probe.close()

    def _spawn(self, name: str, argv: list[str], env: dict) -> _Proc:
        p = _Proc(name, argv, env=env, log_dir=self.log_dir)
        self.procs.append(p)
        return p

    def _wait(self, proc: _Proc, healthy, what: str) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.config.timeout
        while not healthy():
            if not proc.alive():
                raise TeamError(f"{what} exited with {proc.proc.returncode}; {proc.log_path}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TeamError(f"{what} did not become healthy within {self.config.timeout:.0f} s; "
                                f"{proc.log_path}:\n{proc.tail()}")
            time.sleep(0.3)
        self._say(f"  {what}: ready ({time.monotonic() - t0:.1f} s)")

    def _run(self, argv: list[str], env: dict, what: str) -> str:
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        self._say(f"  {what}: python {' '.join(argv[1:])} ({time.monotonic() - t0:.1f} s)")
        with open(self.log_dir / "setup.log", "a") as log:
            log.write(f"\n== {' '.join(argv)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise TeamError(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def prepare(self, env: dict) -> None:
        """The demo pipeline against the team's mlflow server: data, model (reused when registered), store, maps."""
        from store.activations import open_store, store_exists
        from store.errors import StoreMismatchError
        from store.settings import load_settings
        from training import load_model

        from .app import app_config_from_env

        # this process downloads the model once to check the store: no progress bar in the launcher's output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        config = app_config_from_env(env)
        settings = load_settings(self.workspace, env=env)
        py = sys.executable
        if not settings.manifest_path(config.dataset).is_file():
            self._run([py, "-m", "training", "build-demo"], env, "demo data")
        self._run([py, "-m", "training", "fit", "--config", str(ROOT / "training" / "configs" / "demo.yaml")], env,
                  "model")
        url = settings.store_url(config.store)
        fresh = False
        if store_exists(url) and config.model:
            try:
                open_store(url, expect_model=load_model(config.model, settings=settings).meta)
                fresh = True
            except StoreMismatchError:
                fresh = False
        if not fresh:
            self._run([py, "-m", "store", "extract", "--model", config.model or "models:/conceptlens-demo@champion",
                       "--data", config.dataset, "--out", config.store, "--replace"], env, "activation store")
            self._run([py, "-m", "explain", "maps", "--store", config.store], env, "maps")

    def _migrate(self, env: dict) -> None:
        """Migrate the annotation database once, before several workers open it; make the demo accounts."""
        from store.annotations import open_database

        open_database(self.database_url).dispose()
        if self.config.demo_accounts:
            self._run([sys.executable, "-m", "store", "users", "demo"], env, "demo accounts")

    # -- run and stop ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        accounts = self.workspace / "demo-accounts.txt"
        c = self.config
        lines = [f"ConceptLens team stack (workspace {self.workspace})",
                 f"  app        {self.app_url}/   (gunicorn: {c.workers} workers × {c.threads} threads)",
                 f"  mlflow     {self.mlflow_url}/   (tracking on {_shown(self.tracking_backend)}, "
                 f"artifacts in {self.artifacts})",
                 f"  annotations {_shown(self.database_url)}",
                 f"  jobs       Celery on {c.redis} (worker {self._worker_name()})",
                 f"  logs       {self.log_dir}/"]
        if c.demo_accounts and accounts.exists():
            lines.append(f"  accounts   {accounts}")
        return "\n".join(lines)

    def failed(self) -> _Proc | None:
        """The first process of the stack that is no longer running, if any."""
        return next((p for p in self.procs if not p.alive()), None)

    def stop(self) -> None:
        while self.procs:
            self.procs.pop().stop()  # reverse start order: app, worker, mlflow


def team_main(argv: list[str]) -> int:
    """`python -m vis team [--workers N] [--port P] [--mlflow-port P] [--prepare] …`: run the team stack."""
    p = argparse.ArgumentParser(prog="python -m vis team", description=team_main.__doc__)
    p.add_argument("--workspace", default=None,
                   help="workspace directory (default: CONCEPTLENS_WORKSPACE or ./workspace)")
    p.add_argument("--host", default="127.0.0.1", help="address of every service (default loopback)")
    p.add_argument("--port", type=int, default=8050, help="the app's port")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    p.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    p.add_argument("--postgres", default=os.environ.get("CONCEPTLENS_TEAM_POSTGRES", DEFAULT_POSTGRES),
                   help="a PostgreSQL URL of the server to use (its two databases are created there)")
    p.add_argument("--database", default="conceptlens", help="annotation database name")
    p.add_argument("--mlflow-database", default="conceptlens_mlflow", help="tracking database name")
    p.add_argument("--redis", default=os.environ.get("CONCEPTLENS_TEAM_REDIS", DEFAULT_REDIS))
    p.add_argument("--worker-concurrency", type=int, default=1, help="Celery worker processes")
    p.add_argument("--store", default=None, help="activation store name (default: the app's, 'demo')")
    p.add_argument("--dataset", default=None)
    p.add_argument("--model", default=None, help="model reference (default: models:/conceptlens-demo@champion on "
                                                  "the team's server; a local model directory works too)")
    p.add_argument("--prepare", action="store_true",
                   help="run the demo pipeline against the team's mlflow server first (what `make team` does)")
    p.add_argument("--no-demo-accounts", action="store_true", help="do not create the demo accounts")
    args = p.parse_args(argv)
    for name in ("workers", "threads", "worker_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    config = TeamConfig(workspace=Path(args.workspace) if args.workspace else None, host=args.host, port=args.port,
                        mlflow_port=args.mlflow_port, workers=args.workers, threads=args.threads,
                        postgres=args.postgres, database=args.database, mlflow_database=args.mlflow_database,
                        redis=args.redis, worker_concurrency=args.worker_concurrency, store=args.store,
                        dataset=args.dataset, model=args.model, prepare=args.prepare,
                        demo_accounts=not args.no_demo_accounts)
    stopping = []

    def on_term(signum, _frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    stack = TeamStack(config)
    try:
        print("ConceptLens: starting the team stack …", flush=True)
        with stack:
            print(stack.describe(), flush=True)
            print("Ctrl-C stops every service.", flush=True)
            while True:
                dead = stack.failed()
                if dead is not None:
                    print(f"{dead.name} exited with {dead.proc.returncode}; stopping the stack. "
                          f"{dead.log_path}:\n{dead.tail()}", file=sys.stderr, flush=True)
                    return 1
                time.sleep(1.0)
    except KeyboardInterrupt:
        print("ConceptLens: stopping the team stack …", flush=True)
        return 0
    except TeamError as e:
        print(f"ConceptLens team: {e}", file=sys.stderr, flush=True)
        return 1

