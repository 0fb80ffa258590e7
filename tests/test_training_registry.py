"""Saved models and the registry: round trips by path, runs:/ and models:/ URIs, and refusal of pickles."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from training.errors import ModelLoadError, UntrustedModelError
from training.registry import load_model, open_tracking, register_version, save_model
from training.transforms import preprocess
from training.zoo import ModelSpec, build_model

torch.set_num_threads(1)
SPEC = ModelSpec(zoo="vgg_bn", config={"widths": [4, 8, 8], "convs": 1})
TRANSFORM = {"mean": 0.4, "std": 0.2}


def _saved(tmp_path, seed=0):
    torch.manual_seed(seed)
    net = build_model(SPEC).eval()
    d = save_model(tmp_path / f"model{seed}", net, spec=SPEC, input_size=(32, 32), transform=TRANSFORM,
                   layers=["features.6", "features.10"], extra={"name": "unit-test"})
    return net, d


def _same_outputs(a, b):
    x = preprocess(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8), TRANSFORM)
    with torch.no_grad():
        return torch.allclose(a(x), b(x))


def test_local_directory_round_trip(tmp_path, workspace):
    net, d = _saved(tmp_path)
    loaded = load_model(d, settings=workspace)
    assert not loaded.module.training
    assert _same_outputs(net, loaded.module)
    assert loaded.meta["layers"] == ["features.6", "features.10"] and loaded.layers == loaded.meta["layers"]
    assert loaded.meta["classes"] == ["normal", "lesion"]
    assert loaded.transform == TRANSFORM and loaded.input_size == (32, 32)
    assert loaded.meta["model_uri"] == str(d.resolve()) and loaded.meta["version"] is None
    # the weights file itself is an accepted reference too
    assert _same_outputs(net, load_model(d / "weights.pt", settings=workspace).module)


class _WritesMarker:
    """Unpickling this object runs os.system: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path, workspace):
    _, d = _saved(tmp_path)
    marker = tmp_path / "PWNED"
    state = {"features.0.weight": _WritesMarker(marker)}
    torch.save(state, d / "weights.pt")  # torch.save pickles the object: a well-formed file with a payload
    with pytest.raises(UntrustedModelError, match="weights.pt"):
        load_model(d, settings=workspace)
    assert not marker.exists()
    # a plain pickle with the payload is refused the same way
    (d / "weights.pt").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(UntrustedModelError):
        load_model(d, settings=workspace)
    assert not marker.exists()
    # and the control: the payload does write the marker when unpickled unsafely, so the test can fail
    pickle.loads((d / "weights.pt").read_bytes())
    assert marker.exists()


def test_spec_naming_a_user_factory_needs_trust(tmp_path, workspace, monkeypatch):
    _, d = _saved(tmp_path)
    doc = json.loads((d / "model.json").read_text())
    doc["spec"] = {"factory": "os:system", "kwargs": {"command": f"touch {tmp_path / 'PWNED'}"}}
    (d / "model.json").write_text(json.dumps(doc))
    monkeypatch.delenv("CONCEPTLENS_TRUSTED_FACTORIES", raising=False)
    with pytest.raises(UntrustedModelError, match="os:system"):
        load_model(d, settings=workspace)
    assert not (tmp_path / "PWNED").exists()


def test_bad_references(tmp_path, workspace):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "nope", settings=workspace)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model.json"):
        load_model(tmp_path / "empty", settings=workspace)
    _, d = _saved(tmp_path)
    torch.save({"features.0.weight": torch.zeros(1)}, d / "weights.pt")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(d, settings=workspace)


def test_registry_round_trip_alias_follows_best(tmp_path, workspace):
    client, exp = open_tracking(workspace, "unit-test")
    assert client.get_experiment(exp).artifact_location.startswith((workspace.artifact_root).as_uri())
    nets, versions = [], []
    for seed, auroc in [(0, 0.7), (1, 0.9), (2, 0.8)]:
        net, d = _saved(tmp_path, seed)
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(d), "model")
        v, promoted = register_version(client, name="unit-model", run_id=run.info.run_id,
                                       source=f"{run.info.artifact_uri}/model", key=f"k{seed}", val_auroc=auroc)
        client.set_terminated(run.info.run_id)
        nets.append((net, run.info.run_id))
        versions.append((v, promoted))
    assert versions == [(1, True), (2, True), (3, False)]
    champ = load_model("models:/unit-model@champion", settings=workspace)
    assert champ.meta["version"] == 2 and champ.meta["model_uri"] == "models:/unit-model/2"
    assert champ.meta["run_id"] == nets[1][1] and champ.meta["name"] == "unit-model"
    assert _same_outputs(nets[1][0], champ.module)
    v3 = load_model("models:/unit-model/3", settings=workspace)
    assert _same_outputs(nets[2][0], v3.module)
    by_run = load_model(f"runs:/{nets[0][1]}/model", settings=workspace)
    assert by_run.meta["run_id"] == nets[0][1] and _same_outputs(nets[0][0], by_run.module)
    with pytest.raises(ModelLoadError, match="unit-model@nobody"):
        load_model("models:/unit-model@nobody", settings=workspace)

    # another architecture takes the alias even with a lower val/auroc; the same architecture must still beat it
    promoted = []
    for seed, auroc, model in [(3, 0.95, "a"), (4, 0.6, "b"), (5, 0.5, "b")]:
        _net, d = _saved(tmp_path, seed)
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(d), "model")
        promoted.append(register_version(client, name="unit-model", run_id=run.info.run_id,
                                         source=f"{run.info.artifact_uri}/model", key=f"k{seed}", val_auroc=auroc,
                                         model_digest=model)[1])
        client.set_terminated(run.info.run_id)
    assert promoted == [True, True, False]
