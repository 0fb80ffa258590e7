"""The team stack for real: `python -m vis team` against the machine's PostgreSQL and Redis, then a login, a label
through the API, a background retrain through Celery, and the results where they belong (the label in PostgreSQL,
the probe run in the mlflow server); SIGTERM stops every process it started."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from browser import DashClient, call_background, free_port

ROOT = Path(__file__).resolve().parents[1]


def _drop(postgres_url: str, *names: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_url).set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def demo_passwords(path: Path) -> dict[str, str]:
    """{name: password} of the demo accounts file (`name: password` lines, # comments)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, password = line.partition(":")
            out[name.strip()] = password.strip()
    return out


class Launcher:
    """`python -m vis team …` in its own process group; its stdout collected by a thread."""

    def __init__(self, argv: list[str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.5)
                raise AssertionError(f"`vis team` did not print {text!r}:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.3)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def test_app_config_from_env_is_what_every_process_reads():
    """One function maps CONCEPTLENS_STORE / _DATASET / _MODEL onto the app's configuration; the gunicorn app, the
    development server, the Celery worker and the team launcher all call it."""
    import inspect

    from vis import app as vis_app, jobs, team
    from vis.app import AppConfig, app_config_from_env

    assert app_config_from_env({}) == AppConfig()
    env = {"CONCEPTLENS_STORE": "team", "CONCEPTLENS_DATASET": "screening", "CONCEPTLENS_MODEL": "models:/m/3",
           "CONCEPTLENS_OTHER": "x"}
    config = app_config_from_env(env)
    assert (config.store, config.dataset, config.model) == ("team", "screening", "models:/m/3")
    assert app_config_from_env({"CONCEPTLENS_MODEL": "store"}).model is None  # the store's own model
    assert app_config_from_env({"CONCEPTLENS_STORE": ""}).store == AppConfig.store  # empty: unset
    # command-line options override the environment; None leaves it
    assert app_config_from_env(env, store="other", model=None).store == "other"
    assert app_config_from_env(env, store="other", model=None).model == "models:/m/3"
    for fn in (vis_app.create_server, vis_app.serve_main, jobs.worker_main, team.TeamStack.prepare):
        assert "app_config_from_env(" in inspect.getsource(fn), fn.__qualname__
    assert team.worker_command(concurrency=2, hostname="n@h")[1:] == ["-m", "vis", "worker", "--concurrency", "2",
                                                                       "--hostname", "n@h"]


def test_vis_worker_refuses_without_redis(tmp_path):
    """`python -m vis worker` is only for the team setup: with the embedded job cache it says so and exits."""
    import os

    env = {**os.environ, "CONCEPTLENS_WORKSPACE": str(tmp_path / "ws"), "CONCEPTLENS_CACHE_URL": "diskcache"}
    done = subprocess.run([sys.executable, "-m", "vis", "worker"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "only needed with redis://" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "vis", "team-worker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0  # one worker entry only


@pytest.mark.slow
@pytest.mark.services
def test_team_stack_labels_into_postgres_and_tracks_probes_on_the_mlflow_server(app_workspace, tmp_path,
                                                                                  postgres_url, redis_url):
    import psutil
    from mlflow.tracking import MlflowClient
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from loadclient import label_tasks, login
    from store.activations import open_store
    from store.annotations import LabelAction, open_database
    from store.settings import load_settings
    from vis import ids

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key", "annotations.db*", "cache"))
    # The store was extracted from the workspace's own registry; the team's fresh mlflow server has no models, so
    # the app serves the same model from its local directory (same run id: the store accepts it).
    model_dir = next(ws.glob("mlartifacts/*/*/artifacts/model"))
    # The stack serves a store that is not the app's default ("demo"): background jobs must run on it too, so the
    # Celery worker has to read CONCEPTLENS_STORE like the gunicorn app does.
    shutil.copytree(ws / "stores" / "demo.zarr", ws / "stores" / "teamstore.zarr")
    tag = uuid.uuid4().hex[:8]
    database, mlflow_database = f"conceptlens_team_{tag}", f"conceptlens_team_mlflow_{tag}"
    redis = redis_url.rsplit("/", 1)[0] + "/13"  # not the db other tests' workers listen on
    port, mlflow_port = free_port(), free_port()
    app_url, mlflow_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mlflow_port}"
    launcher = Launcher([sys.executable, "-m", "vis", "team", "--workspace", str(ws), "--port", str(port),
                         "--mlflow-port", str(mlflow_port), "--workers", "2", "--postgres", postgres_url,
                         "--database", database, "--mlflow-database", mlflow_database, "--redis", redis,
                         "--model", str(model_dir), "--store", "teamstore"])
    pids: list[int] = []
    try:
        launcher.wait_for("Ctrl-C stops every service", timeout=400)
        out = launcher.output
        assert f"{app_url}/" in out and f"{mlflow_url}/" in out and str(ws / "demo-accounts.txt") in out
        pids = [p.pid for p in psutil.Process(launcher.proc.pid).children(recursive=True)]
        cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in pids]
        assert sum("vis.app:create_server()" in c for c in cmdlines) == 3  # gunicorn master + 2 workers
        assert any("-m vis worker" in c and "--hostname" in c for c in cmdlines)  # the one Celery worker entry
        assert any("mlflow" in c and "server" in c for c in cmdlines)

        passwords = demo_passwords(ws / "demo-accounts.txt")
        http = login(app_url, "radiologist", passwords["radiologist"])
        assert http.get(f"{app_url}/api/whoami").json()["role"] == "radiologist"

        # a label through the API lands in the team's PostgreSQL database
        task = label_tasks(ws, n=1)[0]
        rid = uuid.uuid4().hex
        r = http.post(f"{app_url}/api/sessions/1/labels", json=task.body(rid))
        assert r.status_code == 201, r.text
        team_db = make_url(postgres_url).set(drivername="postgresql+psycopg", database=database)
        db = open_database(team_db.render_as_string(hide_password=False))
        try:
            with db.read() as s:
                rows = s.execute(select(LabelAction.id, LabelAction.author)
                                 .where(LabelAction.request_id == rid)).all()
        finally:
            db.dispose()
        assert [tuple(x) for x in rows] == [(r.json()["action_id"], "radiologist")]

        # a background retrain goes through Redis to the team's Celery worker and logs to the mlflow server
        settings = load_settings(ws, env={})
        store = open_store(settings.store_url("teamstore"))
        default_probes = sorted(open_store(settings.store_url("demo")).probes())
        labels = np.asarray(store.labels())
        dc = DashClient(app_url, login=("radiologist", passwords["radiologist"]))
        run_id = None
        for present, button in ((1, ids.IMAGES_MARK_POS), (0, ids.IMAGES_MARK_NEG)):
            rows_ = [int(i) for i in np.flatnonzero(labels == present)[:15]]
            result, _seconds = call_background(
                dc, app_url, f"{ids.IMAGES_VERSION}.data",
                {f"{button}.n_clicks": 1, f"{ids.IMAGES_STATE}.data": {"selected": rows_},
                 f"{ids.IMAGES_CONCEPT}.value": "mass", f"{ids.IMAGES_LAYER}.value": store.layers[-1],
                 f"{ids.SESSION}.data": 1},
                changed=[f"{button}.n_clicks"], timeout=300)
            run_id = result["response"][ids.IMAGES_VERSION]["data"]
        assert isinstance(run_id, str) and run_id, result
        run = MlflowClient(tracking_uri=mlflow_url).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags.get("conceptlens.kind") == "probe"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the team's server
        # the worker wrote the new probe version into the store the pages show, not into the default store
        team_store = open_store(settings.store_url("teamstore"))
        assert team_store.probe("mass", team_store.layers[-1]).run_id == run_id
        assert sorted(open_store(settings.store_url("demo")).probes()) == default_probes
        assert any(p.is_file() for p in (ws / "team-mlartifacts").rglob("*"))
        worker_log = (ws / "team-logs" / "worker.log").read_text()
        assert "succeeded" in worker_log  # the job ran in the Celery worker, not in the app
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.send_signal(signal.SIGTERM)
        try:
            rc = launcher.proc.wait(timeout=90)
        finally:
            if launcher.proc.poll() is None:
                launcher.proc.kill()
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        _drop(postgres_url, database, mlflow_database)
    assert rc == 0, launcher.output[-3000:]
    assert not left, f"processes left running after SIGTERM: {left}"
    assert "stopping the team stack" in launcher.output
