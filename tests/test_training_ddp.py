"""Lightning strategies work unchanged: two CPU processes on gloo (loopback) train and produce ONE mlflow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers_data import make_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_run(tmp_path):
    manifest = make_manifest(tmp_path / "data", counts={"train": 48, "val": 24, "test": 24}, size=32)
    cfg = {
        "data": {"manifest": str(manifest), "batch_size": 8, "eval_batch_size": 16},
        "model": {"zoo": "vgg_bn", "config": {"widths": [4, 8, 8], "convs": 1}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp",
                    "limit_train_batches": 3, "num_threads": 1, "enable_progress_bar": True},
        "mlflow": {"registered_model": "ddp", "experiment": "ddp"},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK",
                                                              "WORLD_SIZE", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "training", "fit", "--config", str(path), "--workspace", str(ws)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr and "distributed_backend=gloo" in proc.stderr
    assert "Epoch 1: 100%" in proc.stdout  # Lightning's progress bar (tqdm on stdout) reached the terminal
    assert proc.stdout.count("trained models:/ddp/1") == 1  # rank 1 prints nothing

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # each epoch logged once (rank 0 only), with metrics synchronised over both ranks' validation halves
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/auroc")] == [0, 1]
    assert "test/auroc" in run.data.metrics
    versions = client.search_model_versions("name='ddp'")
    assert [int(v.version) for v in versions] == [1] and versions[0].run_id == run.info.run_id
