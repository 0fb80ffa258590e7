"""store.extract: tiny models on patches cut from the real CBIS-DDSM films, checked against direct forward passes."""

from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest
import torch

from helpers_store import assert_same_arrays, make_patch_manifest, store_arrays, tiny_model
from store.activations import open_store
from store.errors import StoreMismatchError
from store.extract import ExtractConfig, _BlockBatches, extract, load_patch, main, rank_blocks
from store.manifest import read_manifest
from training.transforms import preprocess

torch.set_num_threads(1)
FAST = dict(batch_size=3, block=4, k=5, progress_bar=False, threads=1)


@pytest.fixture(scope="module")
def patches(real_dicoms, tmp_path_factory):
    """18 real 32×32 patches; images 4 … 7 (block 1) are black."""
    return make_patch_manifest(tmp_path_factory.mktemp("patches"), real_dicoms, n=18, size=32, zero_block=(4, 8))


def direct(net, meta, images: np.ndarray) -> tuple[dict, np.ndarray]:
    from explain.hooks import Trace

    with torch.inference_mode(), Trace(net, meta["layers"]) as t:
        logits = net(preprocess(images, meta["transform"]))
    return {k: v.numpy() for k, v in t.outputs.items()}, logits.softmax(1).numpy()


def assert_equals_direct(url: str, net, meta, manifest_path) -> None:
    """The store's patches equal the manifest's, and its probabilities, maps and pooled maxima equal direct forward
    passes image by image (within float16 rounding)."""
    images = np.stack([load_patch(rec.image, (32, 32)) for rec in read_manifest(manifest_path).records])
    s = open_store(url)
    np.testing.assert_array_equal(s.images(), images)
    acts, probs = direct(net, meta, images)
    np.testing.assert_allclose(s.probs(), probs, rtol=1e-5, atol=1e-6)
    for name, a in acts.items():
        np.testing.assert_allclose(s.maps_many(name, range(len(images))), a, rtol=2 ** -10, atol=1e-6)
        np.testing.assert_allclose(s.pooled(name, "max"), a.max(axis=(2, 3)), rtol=1e-6, atol=1e-6)


def test_extraction_equals_direct_forward_passes(patches, tmp_path):
    net, meta = tiny_model()
    url = str(tmp_path / "s.zarr")
    r = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    assert (r.n_images, r.blocks_total, r.blocks_written, r.reused) == (18, 5, 5, False)
    manifest = read_manifest(patches)
    s = open_store(url, expect_model=meta, expect_dataset=manifest)
    images = np.stack([load_patch(rec.image, (32, 32)) for rec in manifest.records])  # (image, y, x)
    np.testing.assert_array_equal(s.images(), images)
    np.testing.assert_array_equal(s.labels(), [rec.label for rec in manifest.records])
    assert s.image_ids == manifest.ids and s.attrs["splits"] == ["train"] * 18
    acts, probs = direct(net, meta, images)
    np.testing.assert_allclose(s.probs(), probs, rtol=1e-5, atol=1e-6)
    assert s.layers == ["features.1", "features.4"]
    assert s.layer_shape("features.1") == (4, 32, 32) and s.layer_shape("features.4") == (6, 16, 16)
    for name, a in acts.items():  # a: (image, unit, y, x) float32
        stored = s.maps_many(name, range(18))
        np.testing.assert_allclose(stored, a, rtol=2 ** -10, atol=1e-6)  # float16 rounding
        np.testing.assert_allclose(s.pooled(name, "max"), a.max(axis=(2, 3)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.pooled(name, "mean"), a.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        units = a.shape[1]
        rows = np.moveaxis(stored, 1, 0).reshape(units, -1).astype(np.float64)
        np.testing.assert_array_equal(s.quantiles(name), np.quantile(rows, s.quantile_levels(name), axis=1).T
                                      .astype(np.float32))
        pooled = s.pooled(name, "max")
        idx, val = s.topk(name)
        assert idx.shape == (units, 5)
        for u in range(units):
            assert idx[u].tolist() == sorted(range(18), key=lambda i: (-pooled[i, u], i))[:5]
    a = s.attrs
    assert a["model"] == {k: meta[k] for k in ("model_uri", "run_id", "name", "version")}
    assert a["dataset"]["sha256"] == manifest.sha256 and a["input_size"] == [32, 32]
    assert a["transform"] == meta["transform"] and a["format_version"] == 2 and a["created"] and a["complete"]


def test_rerun_is_a_no_op_and_a_crash_resumes_to_the_same_store(patches, tmp_path):
    net, meta = tiny_model()
    clean = str(tmp_path / "clean.zarr")
    extract(net, meta=meta, manifest=patches, url=clean, config=ExtractConfig(**FAST))
    again = extract(net, meta=meta, manifest=patches, url=clean, config=ExtractConfig(**FAST))
    assert again.reused and again.blocks_written == 0

    class Crash(RuntimeError):
        pass

    calls = {"n": 0}
    original = net.forward

    def crashing(x):
        calls["n"] += 1
        if calls["n"] == 6:  # call 1 sizes the layers; batch 5 of 10: blocks 0 and 1 are whole, block 2 half
            raise Crash("simulated crash")
        return original(x)

    url = str(tmp_path / "crashed.zarr")
    net.forward = crashing
    with pytest.raises(Crash):  # one forward worker: the batches run in order, so exactly blocks 0 and 1 land
        extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(workers=1, **FAST))
    net.forward = original
    partial = open_store(url, allow_incomplete=True)
    assert partial.completed_blocks().tolist() == [True, True, False, False, False]
    resumed = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    assert resumed.blocks_written == 3
    assert_same_arrays(store_arrays(url), store_arrays(clean))
    a, b = open_store(url).attrs, open_store(clean).attrs
    for key in ("created", "finished"):
        a.pop(key), b.pop(key)
    assert a == b

    # killed during the final pass: every block is recorded, the store is not complete; a rerun only finalizes
    w = open_store(url, read_only=False)
    w._array(f"layers/{meta['layers'][0]}/quantiles")[...] = 0
    w._set_attrs({"complete": False})
    again = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    assert again.blocks_written == 0 and not again.reused and open_store(url).complete
    assert_same_arrays(store_arrays(url), store_arrays(clean))


@pytest.mark.parametrize("options", [dict(workers=1), dict(workers=1, background_writes=True), dict(workers=2)],
                         ids=["inline", "background", "workers"])
def test_block_buffers_are_reused_and_every_row_is_rewritten(patches, tmp_path, options):
    """A block takes the buffers of a block already written (memory is touched once per run, not once per block),
    uncleared: the stored maps still equal direct forward passes image by image, the short last block included, so
    nothing of an earlier block reaches a later one."""
    from store import extract as ex

    net, meta = tiny_model()
    allocated, allocate = [], ex._Job._allocate

    def counting(job):
        allocated.append(1)
        return allocate(job)

    url = str(tmp_path / "s.zarr")
    with mock.patch.object(ex._Job, "_allocate", counting):
        r = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**{**FAST, **options}))
    assert r.blocks_written == 5
    # one worker writing its blocks itself needs one buffer; otherwise at most the blocks in flight
    assert len(allocated) == 1 if options == dict(workers=1) else 1 <= len(allocated) <= 4
    assert_equals_direct(url, net, meta, patches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot page-lock memory")
def test_block_buffers_in_ordinary_memory_when_page_locking_fails(patches, tmp_path):
    """Asked to page-lock its block buffers, as on a CUDA host, where the host cannot (here a CPU-only torch),
    extraction says so and goes on in ordinary memory; the store equals direct forward passes."""
    from store import extract as ex

    net, meta = tiny_model()
    allocate = ex._Job._allocate

    def as_on_a_cuda_host(job):
        job.pinned = True  # what prepare() sets when the accelerator is a CUDA device
        return allocate(job)

    url = str(tmp_path / "s.zarr")
    with mock.patch.object(ex._Job, "_allocate", as_on_a_cuda_host), \
            pytest.warns(UserWarning, match="ordinary memory, page-locking failed"):
        r = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(workers=1, **FAST))
    assert r.blocks_written == 5
    assert_equals_direct(url, net, meta, patches)


def test_forward_workers_write_the_same_store_and_a_failing_worker_leaves_whole_blocks(patches, tmp_path):
    """Two forward workers fill one block from two batches at once and write blocks side by side: the store equals
    the one-worker store array by array. A batch that fails in a worker stops the extraction with its error; the
    blocks recorded before it are whole (a resume writes only the others) and the resumed store is the same."""
    net, meta = tiny_model()
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    extract(net, meta=meta, manifest=patches, url=one, config=ExtractConfig(workers=1, **FAST))
    from store import extract as ex

    writes, write, top = [], ex._BlockWriter.write, ex._BlockWriter._top

    def recording_write(writer, block, data, *, spread=True):
        writes.append((writer.store.block_range(block)[0], spread))
        write(writer, block, data, spread=spread)

    counted = []  # (image row of the block, thread) of each layer's top-k

    def recording_top(writer, name, start, layer):
        counted.append((start, threading.current_thread().name))
        top(writer, name, start, layer)

    with mock.patch.object(ex._BlockWriter, "write", recording_write), \
            mock.patch.object(ex._BlockWriter, "_top", recording_top):
        r = extract(net, meta=meta, manifest=patches, url=two, config=ExtractConfig(workers=2, **FAST))
    assert r.blocks_written == 5
    assert_same_arrays(store_arrays(two), store_arrays(one))
    # a block completed while no other batch is being computed (at least the one of the last forward pass) is written
    # spread over the helper threads, whose cores would idle otherwise; any other block by the worker that completed it
    assert len(writes) == 5 and any(spread for _, spread in writes)
    for start, spread in writes:
        threads = [t for s, t in counted if s == start]
        assert len(threads) == 2 and all(t.startswith("store-encode" if spread else "forward") for t in threads)

    original = net.forward

    def failing(x):
        if x.shape[0] == 2:  # the last batch (images 16, 17): earlier batches of other blocks are in flight
            raise ValueError("worker failure")
        return original(x)

    url = str(tmp_path / "failed.zarr")
    net.forward = failing
    with pytest.raises(ValueError, match="worker failure"):
        extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(workers=2, **FAST))
    net.forward = original
    done = open_store(url, allow_incomplete=True).completed_blocks()
    assert not done[4] and not open_store(url, allow_incomplete=True).complete
    resumed = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(workers=2, **FAST))
    assert resumed.blocks_written == int((~done).sum())
    assert_same_arrays(store_arrays(url), store_arrays(one))


def test_background_writes_give_the_same_store_and_a_failing_write_leaves_whole_blocks(patches, tmp_path):
    """With one forward worker and `background_writes` (the default on accelerators), blocks are written by writer
    threads (two here, one per core) while the next batches are computed: the store equals the one written between
    forward passes. A write that fails stops the extraction with its error, the blocks written before it stay
    recorded, and a resume writes the rest into the same store."""
    from store import extract as ex

    net, meta = tiny_model()
    plain, background = str(tmp_path / "plain.zarr"), str(tmp_path / "background.zarr")
    extract(net, meta=meta, manifest=patches, url=plain, config=ExtractConfig(workers=1, **FAST))
    r = extract(net, meta=meta, manifest=patches, url=background,
                config=ExtractConfig(workers=1, background_writes=True, **FAST))
    assert r.blocks_written == 5
    assert_same_arrays(store_arrays(background), store_arrays(plain))

    original, threads = ex._BlockWriter.write, set()

    def failing(writer, block, data, **options):
        threads.add(threading.current_thread().name)
        if block == 3:
            raise OSError("disk gone")
        original(writer, block, data, **options)

    url = str(tmp_path / "failed.zarr")
    with mock.patch.object(ex._BlockWriter, "write", failing), pytest.raises(OSError, match="disk gone"):
        extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(workers=1, background_writes=True,
                                                                                **FAST))
    assert threads and threading.main_thread().name not in threads  # written off the predict loop's thread
    done = open_store(url, allow_incomplete=True).completed_blocks()
    # blocks are taken in order by 2 writers: when block 3 is taken, blocks 0 and 1 are written (block 2 may be in
    # flight, and skipped once the failure is known: a resume writes it)
    assert done[:2].all() and not done[3]
    resumed = extract(net, meta=meta, manifest=patches, url=url,
                      config=ExtractConfig(workers=1, background_writes=True, **FAST))
    assert resumed.blocks_written == int((~done).sum())
    assert_same_arrays(store_arrays(url), store_arrays(plain))


def test_all_zero_block_is_complete_and_not_recomputed(patches, tmp_path):
    net, meta = tiny_model(bias=False)
    meta = {**meta, "transform": {"mean": 0.0, "std": 1.0}}  # black patches → zero input → zero maps
    url = str(tmp_path / "z.zarr")
    extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    s = open_store(url)
    assert np.all(s.maps_many("features.4", range(4, 8)) == 0) and np.all(s.pooled("features.1")[4:8] == 0)
    assert np.any(s.maps("features.4", 3) != 0)
    # forget block 3 only, as a crash would: the resume recomputes that block, not the all-zero block 1
    w = open_store(url, read_only=False)
    w._array("progress")[3] = 0
    w._set_attrs({"complete": False})
    r = extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    assert r.blocks_written == 1


def test_store_of_another_model_is_refused_unless_replaced(patches, tmp_path):
    net, meta = tiny_model(seed=0)
    url = str(tmp_path / "m.zarr")
    extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(**FAST))
    net2, meta2 = tiny_model(seed=1)
    with pytest.raises(StoreMismatchError) as e:
        extract(net2, meta=meta2, manifest=patches, url=url, config=ExtractConfig(**FAST))
    assert "tiny/1" in str(e.value) and "tiny/2" in str(e.value)
    with pytest.raises(StoreMismatchError, match="layers"):
        extract(net, meta=meta, manifest=patches, url=url, config=ExtractConfig(layers=("features.1",), **FAST))
    r = extract(net2, meta=meta2, manifest=patches, url=url, config=ExtractConfig(replace=True, **FAST))
    assert not r.reused and open_store(url, expect_model=meta2).attrs["model"]["version"] == "2"


def test_block_sampler_and_rank_shares():
    batches = _BlockBatches([1, 2], block=4, n_images=10, batch_size=3).batches
    assert batches == [[4, 5, 6], [7], [8, 9]]  # never across a block boundary
    todo = [0, 2, 3, 5, 6, 7, 9]
    shares = [rank_blocks(todo, r, 3) for r in range(3)]
    assert sum(shares, []) == todo and all(s == todo[todo.index(s[0]):todo.index(s[0]) + len(s)] for s in shares)
    assert [len(s) for s in shares] == [2, 2, 3]


def test_command_line_with_a_saved_model_directory(patches, workspace, capsys):
    from training import default_layers
    from training.registry import save_model
    from training.zoo import ModelSpec, VGGConfig, vgg_bn

    torch.manual_seed(0)
    net = vgg_bn(VGGConfig(widths=(4, 8), convs=1)).eval()
    layers = default_layers(net, (32, 32), count=2)
    model_dir = save_model(workspace.workspace / "model", net,
                           spec=ModelSpec(zoo="vgg_bn", config={"widths": [4, 8], "convs": 1}),
                           input_size=(32, 32), transform={"mean": 0.4, "std": 0.2}, layers=layers)
    argv = ["--model", str(model_dir), "--data", str(patches), "--out", "cli", "--batch-size", "4", "--block", "4",
            "--no-progress", "--threads", "1", "--workspace", str(workspace.workspace)]
    assert main(argv) == 0
    s = open_store(workspace.store_url("cli"), expect_dataset=patches)
    assert s.layers == layers and s.attrs["model"]["model_uri"] == str(model_dir.resolve())
    assert "18 images" in capsys.readouterr().out
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    # one forward worker writing on a background thread: the same store, whole
    with mock.patch("store.extract.extract", wraps=extract) as spy:
        assert main([*argv[:4], "--out", "cli-bg", *argv[6:], "--workers", "1", "--background-writes"]) == 0
    assert spy.call_args.kwargs["config"].background_writes is True
    assert_same_arrays(store_arrays(workspace.store_url("cli-bg")), store_arrays(workspace.store_url("cli")))
    assert main([*argv[:-2], "--workspace", str(workspace.workspace), "--layers", "nope"]) == 1
    assert "nope" in capsys.readouterr().err


def test_unknown_layer_fails_before_a_store_is_made(patches, tmp_path):
    net, meta = tiny_model()
    with pytest.raises(KeyError, match="features.7"):
        extract(net, meta=meta, manifest=patches, url=str(tmp_path / "u.zarr"),
                config=ExtractConfig(layers=("features.7",), **FAST))
    assert not (tmp_path / "u.zarr").exists()


def test_patches_are_read_as_training_reads_them(tmp_path):
    from PIL import Image

    from store.errors import ImageError
    from training.datamodule import load_patch as training_patch

    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # 16-bit
    Image.fromarray(ramp).save(tmp_path / "p16.png")
    got = load_patch(tmp_path / "p16.png", (32, 32))
    assert got.dtype == np.uint8 and np.array_equal(got, training_patch(tmp_path / "p16.png"))
    assert got[-1, -1] == (1023 * 60) >> 8
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"small.png.*16×32 px.*32×32"):
        load_patch(tmp_path / "small.png", (32, 32))


def test_an_accelerators_outputs_fill_the_block_buffers_as_the_cpus_do():
    """On an accelerator the maps are rounded to float16 and pooled there before crossing to the host; the result is
    the CPU path's to the bit (CI has no GPU: the accelerator path runs here on CPU tensors; a lent H100 checked it on
    CUDA). Both accept a (batch, unit) output as 1×1 maps."""
    from store.extract import _layer_to_block

    rng = np.random.default_rng(3)
    spatial = torch.from_numpy((rng.standard_normal((5, 4, 6, 7)) * 300).astype(np.float32))  # beyond float16's step
    spatial[0, 0, 0, 0] = 70000.0  # above float16's largest: inf in both
    pooled = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32))
    for a in (spatial, pooled):
        y, x = a.shape[2:] if a.ndim == 4 else (1, 1)
        bufs = [{"maps": np.zeros((8, 4, y, x), np.float16), "max": np.zeros((8, 4), np.float32),
                 "mean": np.zeros((8, 4), np.float32)} for _ in range(2)]
        _layer_to_block(a, bufs[0], slice(2, 7))  # a CPU tensor: the CPU path
        _layer_to_block(a, bufs[1], slice(2, 7), on_device=True)
        for key in ("maps", "max", "mean"):
            np.testing.assert_array_equal(bufs[1][key], bufs[0][key])
        full = a if a.ndim == 4 else a[:, :, None, None]
        np.testing.assert_array_equal(bufs[0]["maps"][2:7], full.numpy().astype(np.float16))
        np.testing.assert_array_equal(bufs[0]["max"][2:7], full.amax(dim=(2, 3)).numpy())
        assert not bufs[0]["maps"][:2].any() and not bufs[0]["maps"][7:].any()  # only the given rows


def test_tf32_is_off_during_extraction_unless_asked_and_the_callers_setting_comes_back(patches, tmp_path):
    """A GPU computing convolutions in TF32 (torch's default for them) moves the maps by up to 1e-3 of their range
    and swaps top-k entries at ties: extraction turns it off for its run unless `tf32=True`, and puts the caller's
    flags back afterwards, also when the run fails."""
    from store import extract as ex

    net, meta = tiny_model()
    seen, predict = [], ex._predict

    def recording(module, job, config):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        predict(module, job, config)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with mock.patch.object(ex, "_predict", recording):
            extract(net, meta=meta, manifest=patches, url=str(tmp_path / "off.zarr"), config=ExtractConfig(**FAST))
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            extract(net, meta=meta, manifest=patches, url=str(tmp_path / "on.zarr"),
                    config=ExtractConfig(tf32=True, **FAST))
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert seen == [(False, False), (True, True)]
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(ValueError, match="no layers"):
            extract(net, meta={**meta, "layers": []}, manifest=patches, url=str(tmp_path / "bad.zarr"),
                    config=ExtractConfig(**FAST))
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
