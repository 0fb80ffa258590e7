"""Extraction under DDP (two CPU processes on gloo, loopback) and after a SIGKILL: stores equal a clean single run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_store import assert_same_arrays, make_patch_manifest, store_arrays, tiny_model
from store.activations import open_store
from store.extract import ExtractConfig, extract

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(batch_size=3, block=4, k=5, progress_bar=False, threads=1)

# Lightning's DDP launcher starts rank 1 by running this same script again with LOCAL_RANK=1.
SCRIPT = f"""
import json, os, sys, time
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from helpers_store import tiny_model
from store.extract import ExtractConfig, extract

manifest, url, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
net, meta = tiny_model()
slow = float(os.environ.get("EXTRACT_TEST_SLOW", "0"))
if slow:  # sleeping does not change a single number, it only leaves time to kill the run
    forward = net.forward
    net.forward = lambda x: (time.sleep(slow), forward(x))[1]
config = ExtractConfig(devices=devices, ddp_timeout_s=120, **{CONFIG!r})
r = extract(net, meta=meta, manifest=manifest, url=url, config=config)
print(json.dumps({{"rank": int(os.environ.get("LOCAL_RANK", 0)), "written": r.blocks_written}}), flush=True)
"""


@pytest.fixture(scope="module")
def patches(real_dicoms, tmp_path_factory):
    return make_patch_manifest(tmp_path_factory.mktemp("ddp"), real_dicoms, n=30, size=32)


@pytest.fixture(scope="module")
def clean(patches, tmp_path_factory):
    """The single-process store every other run must equal."""
    net, meta = tiny_model()
    url = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**CONFIG))
    return url


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(script: Path, patches: Path, url: str, devices: int, **env) -> list[dict]:
    proc = subprocess.run([sys.executable, str(script), str(patches), url, str(devices)], capture_output=True,
                          text=True, timeout=400, env=_env(**env), cwd=script.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _attrs(url: str) -> dict:
    a = dict(open_store(url).attrs)
    a.pop("created"), a.pop("finished")
    return a


@pytest.mark.slow
def test_two_gloo_processes_write_the_same_store_as_one(patches, clean, tmp_path):
    script = tmp_path / "ddp_extract.py"
    script.write_text(SCRIPT)
    url = str(tmp_path / "ddp.zarr")
    lines = _run(script, patches, url, devices=2)
    written = {d["rank"]: d["written"] for d in lines}
    assert written == {0: 4, 1: 4}  # 8 blocks: each rank wrote its own contiguous half
    assert_same_arrays(store_arrays(url), store_arrays(clean))
    assert _attrs(url) == _attrs(clean)


@pytest.mark.slow
def test_sigkill_of_one_rank_then_rerun_resumes_to_the_same_store(patches, clean, tmp_path):
    import psutil

    script = tmp_path / "ddp_extract.py"
    script.write_text(SCRIPT)
    url = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([sys.executable, str(script), str(patches), url, "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(EXTRACT_TEST_SLOW="0.4"), cwd=tmp_path,
                            start_new_session=True)
    progress = Path(url) / "progress" / "c"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(progress.glob("[0-9]*"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "rank 1 was not started"
        os.kill(children[0].pid, signal.SIGKILL)  # rank 1 dies mid-run
        try:
            proc.wait(timeout=60)  # Lightning's observer takes rank 0 down with it
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close(), proc.stderr.close()
    partial = open_store(url, allow_incomplete=True)
    done = partial.completed_blocks()
    assert 2 <= done.sum() < done.size, done  # killed in the middle
    lines = _run(script, patches, url, devices=2)
    assert sum(d["written"] for d in lines) == done.size - done.sum()  # only the missing blocks
    assert_same_arrays(store_arrays(url), store_arrays(clean))
    assert _attrs(url) == _attrs(clean)


@pytest.mark.slow
def test_command_line_ddp_equals_in_process_extraction(patches, tmp_path):
    """`python -m store extract --devices 2`: Lightning restarts the command for rank 1; the store is the same."""
    from training import default_layers, load_model
    from training.registry import save_model
    from training.zoo import ModelSpec, VGGConfig, vgg_bn

    from store.settings import load_settings

    torch.manual_seed(0)
    net = vgg_bn(VGGConfig(widths=(4, 8), convs=1)).eval()
    model_dir = save_model(tmp_path / "model", net, spec=ModelSpec(zoo="vgg_bn", config={"widths": [4, 8], "convs": 1}),
                           input_size=(32, 32), transform={"mean": 0.4, "std": 0.2},
                           layers=default_layers(net, (32, 32), count=2))
    settings = load_settings(tmp_path / "ws")
    loaded = load_model(model_dir, settings=settings)
    single = str(tmp_path / "single.zarr")
    extract(loaded.module, meta=loaded.meta, manifest=patches, url=single, config=ExtractConfig(**CONFIG))
    url = str(tmp_path / "cli.zarr")
    proc = subprocess.run([sys.executable, "-m", "store", "extract", "--model", str(model_dir), "--data", str(patches),
                           "--out", url, "--devices", "2", "--batch-size", "3", "--block", "4", "--k", "5",
                           "--threads", "1", "--no-progress", "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "30 images" in proc.stdout
    assert_same_arrays(store_arrays(url), store_arrays(single))
    assert _attrs(url) == _attrs(single)


@pytest.mark.slow
def test_ddp_resume_when_a_rank_has_no_block_left(patches, clean, tmp_path):
    """One block left for two ranks: rank 0 gets none, still meets rank 1 at the barriers and finalizes."""
    import shutil

    script = tmp_path / "ddp_extract.py"
    script.write_text(SCRIPT)
    url = str(tmp_path / "one_left.zarr")
    shutil.copytree(clean, url)
    w = open_store(url, read_only=False)
    w._array("progress")[7] = 0
    w._set_attrs({"complete": False})
    lines = _run(script, patches, url, devices=2)
    assert {d["rank"]: d["written"] for d in lines} == {0: 0, 1: 1}
    assert_same_arrays(store_arrays(url), store_arrays(clean))
