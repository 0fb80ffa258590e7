"""Training: wall time of a fresh demo fit, training throughput, held-out test AUROC, and the reuse path.

    >>> from tests.benchmarks.bench_training import run
    >>> run(load_settings())    # [{"name": "training/demo_fit_seconds", ...}, ...]

The fresh fit trains the repository's demo config (training/configs/demo.yaml) on the workspace's demo dataset,
with mlflow tracking into a scratch workspace so the workspace's registered model is untouched; the time counts
everything `fit` does (data checks and loading, training, test, figures, registration). The throughput baseline
is the bare network's forward+backward+AdamW loop on the same batches without Lightning, measured in the same
process right before, so the ratio shows what the Lightning loop and augmentation cost. Then `fit` is called on
the real workspace the way `make demo` calls it, which reuses the champion when data, config and code are unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "training" / "configs" / "demo.yaml"


def _bare_loop_images_per_s(config, settings, *, batches: int = 12) -> float:
    """Forward+backward+AdamW of the demo network on random (batch, 1, 64, 64) input: the no-framework baseline."""
    import torch
    import torch.nn.functional as F

    from training.zoo import build_model

    torch.manual_seed(0)
    net = build_model(config.model.spec()).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    b = config.data.batch_size
    x, y = torch.randn(b, 1, 64, 64), torch.randint(0, 2, (b,))
    for i in range(batches + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batches * b / (time.perf_counter() - t0)


def run(settings) -> list[dict]:
    from store.settings import load_settings
    from training.fit import fit, load_config

    manifest = settings.manifest_path("demo")
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: build the demo dataset first (make data)")
    load = os.getloadavg()[0]
    config = load_config(DEMO_CONFIG, overrides=["trainer.enable_progress_bar=false", "mlflow.reuse=false",
                                                 f"data.manifest={manifest}"])
    bare = _bare_loop_images_per_s(config, settings)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        scratch = load_settings(Path(tmp) / "ws", env={}).ensure()
        result = fit(config, settings=scratch)
        shutil.rmtree(scratch.workspace, ignore_errors=True)
    t = time.perf_counter()
    again = fit(load_config(DEMO_CONFIG, overrides=["trainer.enable_progress_bar=false"]), settings=settings)
    reuse_s = time.perf_counter() - t
    auroc = result.metrics.get("test/auroc", float("nan"))
    cond = f"{os.cpu_count()} CPUs, load average {load:.1f} at start; {config.trainer.max_epochs} epochs"
    return [
        {"name": "training/demo_fit_seconds", "value": round(result.seconds, 1), "unit": "s", "goal": "<= 180",
         "ok": result.seconds <= 180, "note": f"fresh fit incl. mlflow logging and registration; {cond}"},
        {"name": "training/throughput", "value": round(result.images_per_s, 1), "unit": "img/s", "goal": None,
         "ok": None, "baseline": {"name": "bare forward+backward loop", "value": round(bare, 1), "unit": "img/s"},
         "note": "training epochs only (validation excluded), augmentation included"},
        {"name": "training/test_auroc", "value": round(auroc, 4), "unit": "", "goal": ">= 0.90", "ok": auroc >= 0.90,
         "note": f"held-out test split; best epoch {int(result.metrics.get('best/epoch', -1))} by val/auroc "
                 f"{result.metrics.get('best/val_auroc', float('nan')):.3f}"},
        {"name": "training/test_sensitivity_at_90spec", "value": round(result.metrics.get("test/sens_at_90spec",
                                                                                           float("nan")), 4),
         "unit": "", "goal": None, "ok": None},
        {"name": "training/reuse_seconds", "value": round(reuse_s, 2), "unit": "s", "goal": "<= 15",
         "ok": again.reused and reuse_s <= 15,
         "note": f"make demo rerun: {'reused ' + str(again.model_uri) if again.reused else 'trained (no champion)'}"},
    ]
