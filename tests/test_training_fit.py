"""fit(): tracking, registration, reuse, determinism, the CLI, and clear errors before any run exists."""

from __future__ import annotations

import csv
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers_data import make_manifest
from training.errors import ConfigError, DataError, TrackingError
from training.fit import fit, load_config, main
from training.registry import load_model
from training.transforms import preprocess

torch.set_num_threads(1)


def tiny_config(manifest, **over) -> dict:
    cfg = {
        "data": {"manifest": str(manifest), "batch_size": 16, "eval_batch_size": 64},
        "model": {"zoo": "vgg_bn", "config": {"widths": [4, 8, 8], "convs": 1}},
        "optim": {"lr": 0.01},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False},
        "mlflow": {"registered_model": "tiny", "experiment": "tiny"},
    }
    for dotted, v in over.items():
        *parents, last = dotted.split("__")
        d = cfg
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return cfg


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("tiny"), counts={"train": 48, "val": 24, "test": 24}, size=32)


def _runs(settings, experiment="tiny"):
    db = Path(settings.tracking_uri.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_fit_logs_registers_and_reuses(tiny_manifest, workspace):
    r = fit(tiny_config(tiny_manifest), settings=workspace)
    assert not r.reused and r.champion and r.version == 1 and r.model_uri == "models:/tiny/1"
    client = MlflowClient(workspace.tracking_uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(workspace.artifact_root.as_uri())
    # config, data hash and code version are on the run
    assert run.data.params["data.batch_size"] == "16" and run.data.params["optim.lr"] == "0.01"
    sha = run.data.params["data.manifest_sha256"]
    assert sha == run.data.tags["conceptlens.manifest_sha256"] and len(sha) == 64
    assert len(run.data.tags.get("mlflow.source.git.commit", "")) == 40
    assert run.data.tags["conceptlens.git_dirty"] in ("true", "false")
    # per-epoch metrics, one point per epoch, and test metrics
    hist = client.get_metric_history(r.run_id, "val/auroc")
    assert sorted(m.step for m in hist) == [0, 1]
    assert [m.step for m in client.get_metric_history(r.run_id, "train/loss")] == [0, 1]
    for k in ("test/auroc", "test/accuracy", "test/sens_at_90spec", "val/sens_at_90spec", "fit/images_per_s"):
        assert k in run.data.metrics, k
    assert r.metrics["test/auroc"] == pytest.approx(run.data.metrics["test/auroc"])
    assert r.metrics["test/auroc"] > 0.8  # blobs are easy: a model that learned nothing fails this
    files = {f.path for f in client.list_artifacts(r.run_id)} | {
        f.path for d in ("figures", "model") for f in client.list_artifacts(r.run_id, d)}
    assert {"config.yaml", "figures/test_roc.png", "figures/test_roc.json", "figures/test_confusion.png",
            "model/model.json", "model/weights.pt"} <= files
    cfg_text = (Path(client.download_artifacts(r.run_id, "config.yaml", str(workspace.cache_dir))).read_text())
    assert "vgg_bn" in cfg_text and "batch_size: 16" in cfg_text
    png = client.download_artifacts(r.run_id, "figures/test_roc.png", str(workspace.cache_dir))
    assert Image.open(png).size[0] > 200
    # the same curve as numbers, for the app to overlay runs: it runs from (0, 0) to (1, 1), never going down, and
    # its area is the logged test AUROC
    roc = json.loads(Path(client.download_artifacts(r.run_id, "figures/test_roc.json",
                                                    str(workspace.cache_dir))).read_text())
    fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
    assert len(fpr) == len(tpr) > 2 and (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert roc["auroc"] == pytest.approx(run.data.metrics["test/auroc"], abs=1e-6)
    assert roc["specificity"] == 0.9  # the operating point of test/sens_at_90spec, which the app marks
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(roc["auroc"], abs=1e-4)
    # registered, champion, loadable; predictions match the local checkpoint
    mv = client.get_model_version_by_alias("tiny", "champion")
    assert int(mv.version) == 1 and mv.run_id == r.run_id
    loaded = load_model("models:/tiny@champion", settings=workspace)
    local = load_model(r.checkpoint, settings=workspace)
    assert loaded.meta["layers"] == ["features.2", "features.6", "features.10"]
    assert loaded.meta["classes"] == ["normal", "lesion"] and loaded.meta["input_size"] == [32, 32]
    imgs = np.stack([np.asarray(Image.open(p)) for p in sorted((tiny_manifest.parent / "images").glob("test-*"))])
    x = preprocess(imgs, loaded.transform)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), local.module(x))
    # same data, config and code: no training, no new run
    t = time.perf_counter()
    again = fit(tiny_config(tiny_manifest), settings=workspace)
    assert again.reused and again.run_id == r.run_id and again.version == 1
    assert time.perf_counter() - t < 10 and len(_runs(workspace)) == 1
    # a changed config trains again; the champion alias only moves to a better val/auroc
    r3 = fit(tiny_config(tiny_manifest, optim__lr=0.02), settings=workspace)
    assert not r3.reused and r3.version == 2 and len(_runs(workspace)) == 2
    champ = client.get_model_version_by_alias("tiny", "champion")
    expect = r3 if r3.metrics["best/val_auroc"] > r.metrics["best/val_auroc"] else r
    assert champ.run_id == expect.run_id and r3.champion == (expect is r3)
    # rerunning either config reuses its own version, champion or not: nothing is trained twice
    for cfg, first in ((tiny_config(tiny_manifest, optim__lr=0.02), r3), (tiny_config(tiny_manifest), r)):
        again = fit(cfg, settings=workspace)
        assert again.reused and again.version == first.version and again.champion == (first is expect)
    assert len(_runs(workspace)) == 2


def test_new_data_takes_the_alias(tiny_manifest, workspace, tmp_path):
    first = fit(tiny_config(tiny_manifest, trainer__max_epochs=1), settings=workspace)
    assert first.champion
    # other data: its val/auroc is not comparable with the champion's, and the champion no longer fits the data
    other = make_manifest(tmp_path / "other", counts={"train": 48, "val": 24, "test": 24}, size=32, seed=7,
                          contrast=25)
    second = fit(tiny_config(other, trainer__max_epochs=1, mlflow__registered_model="tiny"), settings=workspace)
    assert second.version == 2 and second.champion
    client = MlflowClient(workspace.tracking_uri)
    assert client.get_model_version_by_alias("tiny", "champion").run_id == second.run_id


def test_same_seed_same_weights(tiny_manifest, workspace):
    cfg = tiny_config(tiny_manifest, trainer__max_epochs=1, trainer__limit_train_batches=2,
                      mlflow__reuse=False, mlflow__register=False)
    a = fit(cfg, settings=workspace)
    b = fit(cfg, settings=workspace)
    assert a.run_id != b.run_id
    wa = torch.load(a.checkpoint / "weights.pt", weights_only=True)
    wb = torch.load(b.checkpoint / "weights.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = fit(load_config(cfg, overrides=["seed=1"]), settings=workspace)
    wc = torch.load(c.checkpoint / "weights.pt", weights_only=True)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_fast_dev_run_trains_without_tracking(tiny_manifest, workspace):
    r = fit(tiny_config(tiny_manifest, trainer__fast_dev_run=True), settings=workspace)
    assert r.run_id is None and r.model_uri is None and not r.reused
    assert (r.checkpoint / "weights.pt").is_file()
    assert _runs(workspace) == []


def test_resnet_and_user_factory_train(tiny_manifest, workspace, monkeypatch):
    over = {"trainer__max_epochs": 1, "trainer__limit_train_batches": 2, "mlflow__register": False}
    r = fit(tiny_config(tiny_manifest, model={"zoo": "resnet", "config": {"widths": [4, 8, 8]}}, **over),
            settings=workspace)
    assert load_model(r.checkpoint, settings=workspace).meta["layers"] == ["layer1.0", "layer2.0", "layer3.0"]
    model = {"zoo": None, "factory": "test_zoo:tiny_factory", "kwargs": {"width": 5}}
    r = fit(tiny_config(tiny_manifest, model=model, **over), settings=workspace)
    monkeypatch.setenv("CONCEPTLENS_TRUSTED_FACTORIES", "test_zoo")
    m = load_model(r.checkpoint, settings=workspace)
    assert m.module[0].out_channels == 5 and m.meta["layers"] == ["1", "4"]


# -- bad input: a clear error before training, and no run left behind -------------------------------------------------
def _rewrite(manifest: Path, dst: Path, edit) -> Path:
    rows = list(csv.DictReader(open(manifest)))
    rows = edit(rows)
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "manifest.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return out


def _abs_images(rows, root):
    for r in rows:
        r["image"] = str((root / r["image"]).resolve())
    return rows


def _missing(rows):
    rows[3]["image"] = rows[3]["image"].replace(".png", "-gone.png")
    return rows


def _unknown_label(rows):
    rows[5]["label"] = "2"
    return rows


def _single_class(rows):
    return [r for r in rows if not (r["split"] == "train" and r["label"] == "1")]


def _empty_split(rows):
    return [r for r in rows if r["split"] != "val"]


BAD = {
    "missing file": (_missing, r"missing file .*-gone\.png"),
    "unknown label": (_unknown_label, r"unknown label '2'"),
    "single class": (_single_class, r"split 'train' has only 'normal' patches"),
    "empty split": (_empty_split, r"split 'val' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_fails_before_any_run(case, tiny_manifest, workspace, tmp_path):
    edit, match = BAD[case]
    bad = _rewrite(tiny_manifest, tmp_path / "bad", lambda rows: edit(_abs_images(rows, tiny_manifest.parent)))
    t = time.perf_counter()
    with pytest.raises(DataError, match=match):
        fit(tiny_config(bad), settings=workspace)
    assert time.perf_counter() - t < 10
    assert _runs(workspace) == []


def test_mixed_sizes_fail_before_any_run(workspace, tmp_path):
    m = make_manifest(tmp_path / "mixed", counts={"train": 8, "val": 4, "test": 4}, size=32,
                      sizes={"train-0005": 24})
    with pytest.raises(DataError, match=r"mixed sizes: 32×32 .*24×24 \(e.g. 'train-0005'\)"):
        fit(tiny_config(m), settings=workspace)
    assert _runs(workspace) == []


def test_unreachable_tracking_server_fails_fast(tiny_manifest, tmp_path):
    from store.settings import load_settings

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_settings(tmp_path / "ws", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    t = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port} is unreachable"):
        fit(tiny_config(tiny_manifest), settings=settings)
    assert time.perf_counter() - t < 20


@pytest.mark.parametrize("cfg, match", [
    ({"data": {"batch_sise": 3}}, r"data: unknown key\(s\) \['batch_sise'\]"),
    ({"trainer": {"max_epochs": "ten"}}, r"trainer.max_epochs: expected an integer, got 'ten'"),
    ({"optim": {"schedule": "step"}}, r"optim.schedule: 'step'"),
    ({"model": {"zoo": "vgg_bn", "config": {"depth": 3}}}, r"unknown key\(s\) \['depth'\] for vgg_bn"),
    ({"mlflow": {"reuse": "yes"}}, r"mlflow.reuse: expected true or false"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_model_that_does_not_fit_the_patches(tiny_manifest, workspace):
    cfg = tiny_config(tiny_manifest, model={"zoo": "vgg_bn", "config": {"widths": [4, 4, 4, 4, 4, 4, 4]}})
    with pytest.raises(ConfigError, match=r"does not take \(32, 32\) patches|layers"):
        fit(cfg, settings=workspace)
    assert _runs(workspace) == []


def test_cli(tiny_manifest, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_manifest, trainer__max_epochs=1)))
    ws = tmp_path / "ws"
    assert main(["--config", str(path), "--workspace", str(ws), "--set", "trainer.limit_train_batches=2",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("trained models:/tiny/1")
    assert json.loads(out[-1])["version"] == 1
    assert main(["--config", str(path), "--workspace", str(ws), "--set", "trainer.limit_train_batches=2"]) == 0
    assert capsys.readouterr().out.startswith("reused models:/tiny/1")
    assert main(["--config", str(path), "--workspace", str(ws), "--set", "trainer.epochs=2"]) == 2
    assert "unknown key(s) ['epochs']" in capsys.readouterr().err


def test_bad_trainer_arguments_fail_before_any_run(tiny_manifest, workspace):
    with pytest.raises(ConfigError, match=r"trainer: .*no_such_strategy"):
        fit(tiny_config(tiny_manifest, trainer__strategy="no_such_strategy"), settings=workspace)
    assert _runs(workspace) == []


# -- auxiliary concept targets (model.aux_concepts) -------------------------------------------------------------------
def _with_mass_masks(manifest: Path, dst: Path) -> Path:
    """The tiny manifest with a `mass` mask (its bright pixels) on every lesion patch."""
    root = manifest.parent
    (dst / "masks").mkdir(parents=True, exist_ok=True)

    def edit(rows):
        rows = _abs_images(rows, root)
        for r in rows:
            if r["label"] == "1":
                img = np.asarray(Image.open(r["image"]))
                path = dst / "masks" / f"{r['id']}.png"
                Image.fromarray(((img > np.percentile(img, 90)) * 255).astype(np.uint8)).save(path)
                r["masks"] = f"mass={path}"
        return rows

    return _rewrite(manifest, dst, edit)


def test_aux_concept_head_trains_and_the_saved_network_stays_a_plain_classifier(tiny_manifest, workspace, tmp_path):
    from training.module import ClassifierModule, ConceptTargetDataset
    from store.manifest import read_manifest
    from training.datamodule import PatchDataset

    manifest = _with_mass_masks(tiny_manifest, tmp_path / "masked")
    records = read_manifest(manifest).split("train")
    ds = ConceptTargetDataset(PatchDataset(records), ["mass"])
    img, target = ds[1]
    assert target.tolist() == [records[1].label, int("mass" in records[1].masks)] == [1, 1]
    assert ds[0][1].tolist() == [0, 0]

    over = {"trainer__max_epochs": 1, "trainer__limit_train_batches": 3, "mlflow__register": False}
    plain = fit(tiny_config(manifest, **over), settings=workspace)
    aux = fit(tiny_config(manifest, model__aux_concepts=["mass"], model__aux_weight=2.0, **over), settings=workspace)
    wp = torch.load(plain.checkpoint / "weights.pt", weights_only=True)
    wa = torch.load(aux.checkpoint / "weights.pt", weights_only=True)
    assert sorted(wa) == sorted(wp)  # the auxiliary head is not part of the saved network …
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)  # … but its loss changed what the network learned
    m = load_model(aux.checkpoint, settings=workspace)
    assert not any(mod._forward_hooks for mod in m.module.modules())
    assert m.module(torch.zeros(3, 1, 32, 32)).shape == (3, 2)

    # the module alone: labels (batch, 1 + concepts); aux_weight 0 is the plain classification loss
    from training.zoo import vgg_bn

    torch.manual_seed(0)
    net = vgg_bn(widths=[4, 8], convs=1)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1]])
    losses = {}
    for w in (0.0, 1.0):
        module = ClassifierModule(net, aux_concepts=["mass"], aux_layer="features.6", aux_channels=8, aux_weight=w)
        losses[w] = float(module.model_step((x, y), "val").detach())
        module.remove_aux_hook()
    plain_loss = float(torch.nn.functional.cross_entropy(net(x), y[:, 0]).detach())
    assert losses[0.0] == pytest.approx(plain_loss) and losses[1.0] > plain_loss


@pytest.mark.parametrize("key, weight", [("aux_concepts", "aux_weight"), ("aux_masks", "aux_mask_weight")])
def test_aux_targets_without_masks_fail_before_any_run(tiny_manifest, workspace, key, weight):
    with pytest.raises(ConfigError, match=rf"{key}: \['spiculated_margin'\] have no mask"):
        fit(tiny_config(tiny_manifest, **{f"model__{key}": ["spiculated_margin"]}), settings=workspace)
    assert _runs(workspace) == []
    with pytest.raises(ConfigError, match=weight):
        load_config(tiny_config(tiny_manifest, **{f"model__{weight}": -0.5}))


def test_dense_mask_head_trains_and_is_absent_from_the_saved_network(tiny_manifest, workspace, tmp_path):
    from training.module import ClassifierModule

    manifest = _with_mass_masks(tiny_manifest, tmp_path / "masked")
    over = {"trainer__max_epochs": 1, "trainer__limit_train_batches": 3, "mlflow__register": False}
    plain = fit(tiny_config(manifest, **over), settings=workspace)
    dense = fit(tiny_config(manifest, model__aux_masks=["mass"], model__aux_mask_weight=2.0, **over),
                settings=workspace)
    wp = torch.load(plain.checkpoint / "weights.pt", weights_only=True)
    wd = torch.load(dense.checkpoint / "weights.pt", weights_only=True)
    assert sorted(wd) == sorted(wp)  # no mask head in the saved network …
    assert not all(torch.equal(wd[k], wp[k]) for k in wd)  # … but its loss changed what the network learned
    m = load_model(dense.checkpoint, settings=workspace)
    assert not any(mod._forward_hooks for mod in m.module.modules())
    assert m.module(torch.zeros(3, 1, 32, 32)).shape == (3, 2)

    # the module alone: the dense loss is the soft BCE of a 1×1 convolution on the aux layer's maps
    from training.zoo import vgg_bn

    F = torch.nn.functional
    torch.manual_seed(0)
    net = vgg_bn(widths=[4, 8], convs=1).eval()  # features.6: (batch, 8, 8, 8) for 16×16 input
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([[0], [1], [1], [0]])
    target = torch.zeros(4, 1, 8, 8)  # (batch, mask concept, y, x): the fraction of each cell the mask covers
    target[1, 0, :3, :3] = 1.0
    target[2, 0, 4, 2:6] = 0.25
    module = ClassifierModule(net, aux_layer="features.6", aux_channels=8, aux_masks=["mass"], aux_mask_weight=3.0)
    assert module.aux_head is None and isinstance(module.aux_mask_head, torch.nn.Conv2d)
    loss = float(module.model_step((x, y, target), "val").detach())
    with torch.no_grad():
        logits = module.aux_mask_head(net.features(x))  # (4, 1, 8, 8)
        expected = F.cross_entropy(net(x), y[:, 0]) + 3.0 * F.binary_cross_entropy_with_logits(logits, target)
        plain = F.cross_entropy(net(x), y[:, 0])
    assert loss == pytest.approx(float(expected), rel=1e-5) and loss > float(plain)
    with pytest.raises(ConfigError, match=r"do not match the aux layer's maps"):
        module.model_step((x, y, torch.zeros(4, 1, 4, 4)), "val")
    module.remove_aux_hook()


def test_concept_units_each_learn_their_concept_alone(tiny_manifest, workspace, tmp_path):
    from training.module import MAX_POSITIVE_WEIGHT, ClassifierModule
    from training.zoo import vgg_bn

    F = torch.nn.functional
    torch.manual_seed(0)
    net = vgg_bn(widths=[4, 8], convs=1).eval()  # features.6: (batch, 8, 8, 8) for 16×16 input
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([[0], [1], [1], [0]])
    target = torch.zeros(4, 2, 8, 8)  # two concepts' coverage of each cell
    target[1, 0, :3, :3] = 1.0
    target[2, 0, 4, 2:6] = 0.25  # touched: a positive cell for the concept units
    target[2, 1, 0, :] = 0.5
    module = ClassifierModule(net, aux_layer="features.6", aux_channels=8, aux_masks=["mass", "rim"],
                              aux_mask_weight=2.0, aux_mask_units=3)
    head = module.aux_mask_head  # a scale and a bias for each of units 0–5, nothing else
    assert (head.in_channels, head.out_channels, head.groups) == (6, 6, 6) and head.weight.numel() == 6
    with torch.no_grad():
        head.weight.copy_(torch.linspace(0.5, 2.0, 6).view(6, 1, 1, 1))
    loss = float(module.model_step((x, y, target), "val").detach())
    with torch.no_grad():
        maps = net.features(x)  # (4, 8, 8, 8)
        binary = (target > 0).float()
        terms = []
        for unit in range(6):  # units 0–2: mass, 3–5: rim
            t = binary[:, unit // 3]
            share = float(t.mean())
            w = torch.where(t > 0, min((1 - share) / share, MAX_POSITIVE_WEIGHT), 1.0)
            logit = head.weight[unit, 0, 0, 0] * maps[:, unit] + head.bias[unit]
            terms.append(F.binary_cross_entropy_with_logits(logit, t, weight=w, reduction="none"))
        expected = F.cross_entropy(net(x), y[:, 0]) + 2.0 * torch.stack(terms).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    module.remove_aux_hook()
    with pytest.raises(ConfigError, match="3 units for each of 3 concepts, but 'features.6' has 8 units"):
        ClassifierModule(net, aux_layer="features.6", aux_channels=8, aux_masks=["a", "b", "c"], aux_mask_units=3)
    with pytest.raises(ConfigError, match="aux_mask_units: 2 must be ≥ 0, and needs aux_masks"):
        load_config(tiny_config(tiny_manifest, model__aux_mask_units=2))
    with pytest.raises(ConfigError, match="aux_mask_units: -1"):
        load_config(tiny_config(tiny_manifest, model__aux_masks=["mass"], model__aux_mask_units=-1))
    # through fit: more concept units than the layer has fail before any run; then it trains on the manifest's
    # masks, and the saved network is the plain classifier
    manifest = _with_mass_masks(tiny_manifest, tmp_path / "masked")
    runs = len(_runs(workspace))
    with pytest.raises(ConfigError, match="1000 units for each of 1 concepts"):
        fit(tiny_config(manifest, model__aux_masks=["mass"], model__aux_mask_units=1000), settings=workspace)
    assert len(_runs(workspace)) == runs
    res = fit(tiny_config(manifest, model__aux_masks=["mass"], model__aux_mask_units=2, trainer__max_epochs=1,
                          trainer__limit_train_batches=3, mlflow__register=False), settings=workspace)
    m = load_model(res.checkpoint, settings=workspace)
    assert not any(mod._forward_hooks for mod in m.module.modules())
    assert m.module(torch.zeros(3, 1, 32, 32)).shape == (3, 2)


def test_aux_masks_are_off_by_default_and_a_misspelled_key_fails(tiny_manifest):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['aux_mask'\]"):
        load_config(tiny_config(tiny_manifest, model__aux_mask=["mass"]))
    cfg = load_config(tiny_config(tiny_manifest))
    assert cfg.model.aux_masks is None  # off by default
