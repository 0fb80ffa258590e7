"""Team setup: an `mlflow server` on loopback with PostgreSQL as backend store and served artifacts.

A tiny fit tracks and registers against it; MlflowClient reads the run, its metrics, the version and the alias
back, and load_model fetches the model through the server's artifact proxy. The database is dropped afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers_data import make_manifest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(postgres_url, tmp_path):
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    db = f"conceptlens_mlflow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    backend = url.set(drivername="postgresql+psycopg", database=db).render_as_string(hide_password=False)
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the server migrates the fresh database before it answers
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, backend
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.mark.services
@pytest.mark.slow
def test_fit_against_mlflow_server_on_postgres(mlflow_server, tmp_path):
    from store.settings import load_settings
    from training.fit import fit
    from training.registry import load_model

    uri, backend = mlflow_server
    manifest = make_manifest(tmp_path / "data", counts={"train": 32, "val": 16, "test": 16}, size=32)
    settings = load_settings(tmp_path / "ws", env={"MLFLOW_TRACKING_URI": uri})
    cfg = {
        "data": {"manifest": str(manifest), "batch_size": 16},
        "model": {"zoo": "vgg_bn", "config": {"widths": [4, 8, 8], "convs": 1}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False, "num_threads": 1},
        "mlflow": {"registered_model": "team-tiny", "experiment": "team"},
    }
    r = fit(cfg, settings=settings)
    assert r.version == 1 and not r.reused

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    assert [m.step for m in client.get_metric_history(r.run_id, "val/auroc")] == [0, 1]
    assert run.data.metrics["test/auroc"] == pytest.approx(r.metrics["test/auroc"])
    mv = client.get_model_version_by_alias("team-tiny", "champion")
    assert int(mv.version) == 1 and mv.run_id == r.run_id
    assert {f.path for f in client.list_artifacts(r.run_id, "figures")} == {
        "figures/test_roc.png", "figures/test_roc.json", "figures/test_confusion.png"}
    # the files landed in the server's artifact store, and come back through it
    assert list((tmp_path / "artifacts").rglob("weights.pt"))
    m = load_model("models:/team-tiny@champion", settings=settings)
    assert m.meta["run_id"] == r.run_id and m.meta["version"] == 1
    # the rows are in PostgreSQL
    import psycopg
    from sqlalchemy.engine import make_url

    with psycopg.connect(make_url(backend).set(drivername="postgresql").render_as_string(hide_password=False)) as c:
        assert c.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (r.run_id,)).fetchone()[0] == 1
        assert c.execute("SELECT name FROM registered_models").fetchall() == [("team-tiny",)]
    # same data and config: the server's champion is reused
    assert fit(cfg, settings=settings).reused
