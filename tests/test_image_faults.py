"""Bad input to store.images (RELIABILITY.md items 1-3 and 5): broken copies of the real films, crafted headers,
pixel bombs, missing decoders, patient-identifier sentinels, and a hypothesis byte-flip fuzz.

Hostile files are read in a subprocess under an address-space limit and a timeout, so a hang or a runaway
allocation fails the test instead of the test run.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from helpers_images import write_dicom
from store.errors import ImageError, MissingDecoderError, PixelBudgetError
from store.images import read_image

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 2 * 1024**3  # address space for the reading subprocess (imports ≈ 0.5 GiB; one real film ≈ 0.15 GiB)

# Reads each path given on stdin (JSON list) and prints one JSON line per path: outcome, message, seconds, peak RSS.
READER = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    sys.path.insert(0, {root!r})
    {prelude}
    from store.images import read_image, MedicalImage
    from store.errors import ImageError

    def peak_mb():  # VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    for item in json.loads(sys.stdin.read()):
        path, kw = item if isinstance(item, list) else (item, {{}})
        reset_peak()
        before = peak_mb()
        t = time.perf_counter()
        try:
            img = read_image(path, **kw)
            out = {{"outcome": "image", "type": "MedicalImage", "message": repr(img), "shape": list(img.shape)}}
        except ImageError as e:
            out = {{"outcome": "error", "type": type(e).__name__, "message": str(e)}}
        except BaseException as e:  # anything else is a bug: report it, never crash the reader
            out = {{"outcome": "crash", "type": type(e).__name__, "message": str(e)[:300]}}
        out["seconds"] = time.perf_counter() - t
        out["peak_mb"] = peak_mb()
        out["growth_mb"] = out["peak_mb"] - before
        print(json.dumps(out), flush=True)
    """
)


def read_in_subprocess(items: list, *, timeout: float = 120, prelude: str = "") -> list[dict]:
    """read_image on each path (or [path, kwargs]) in a fresh, memory-limited process; one result dict each."""
    code = READER.format(limit=MEMORY_LIMIT, root=str(ROOT), prelude=prelude)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([[str(i[0]), i[1]] if isinstance(i, tuple) else str(i) for i in items]),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(items), proc.stderr[-2000:]
    return lines


# -- broken copies of a real film -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_lcc(real_dicoms) -> Path:
    return next(p for p in real_dicoms if p.name == "1-130.dcm")


@pytest.fixture(scope="module")
def native_lcc(real_lcc, tmp_path_factory) -> Path:
    """The real LCC film rewritten uncompressed (Explicit VR Little Endian)."""
    ds = pydicom.dcmread(real_lcc)
    ds.decompress(generate_instance_uid=False)  # the same SOP instance, re-encoded
    out = tmp_path_factory.mktemp("native") / "lcc_native.dcm"
    ds.save_as(out)
    return out


def _pixel_tag_offset(data: bytes) -> int:
    off = data.rfind(b"\xe0\x7f\x10\x00")
    assert off > 0
    return off


def _broken_copies(real: Path, native: Path, d: Path) -> dict[str, tuple[Path, str, str]]:
    """name → (path, expected error type, a phrase the message must contain)."""
    data = real.read_bytes()
    cases: dict[str, tuple[Path, str, str]] = {}

    def put(name, content, etype, phrase):
        p = d / f"{name}.dcm"
        p.write_bytes(content)
        cases[name] = (p, etype, phrase)

    put("empty", b"", "ImageError", "empty file")
    put("truncated_preamble", data[:100], "ImageError", "truncated")
    put("truncated_meta", data[:140], "ImageError", "DICOM")
    put("truncated_header", data[:600], "ImageError", "Rows/Columns")
    put("truncated_pixels", data[: len(data) // 2], "ImageError", "truncated or corrupt")
    put("truncated_last_bytes", data[:-10], "ImageError", "truncated or corrupt")
    put("no_preamble", data[128:], "ImageError", "not a DICOM, PNG or TIFF")
    put("no_preamble_no_magic", data[132:], "ImageError", "not a DICOM, PNG or TIFF")
    put("not_dicom_text", b"patient list, not an image\n" * 50, "ImageError", "not a DICOM, PNG or TIFF")
    put("not_dicom_random", np.random.default_rng(0).bytes(4096), "ImageError", "not a DICOM, PNG or TIFF")
    pix = _pixel_tag_offset(data)
    b = bytearray(data)
    struct.pack_into("<I", b, pix + 8, len(data) * 4)  # pixel data length far past the end of the file
    put("pixel_length_past_eof", bytes(b), "ImageError", "pixel data claims")
    b = bytearray(data)
    b[pix + 12 + 64 : pix + 12 + 4000] = b"\xff" * (4000 - 64)  # corrupt RLE segments
    put("corrupt_rle", bytes(b), "ImageError", "cannot decode pixel data")
    nat = native.read_bytes()
    npix = _pixel_tag_offset(nat)
    b = bytearray(nat)
    struct.pack_into("<I", b, npix + 8, len(nat) + 1000)
    put("native_length_past_eof", bytes(b), "ImageError", "pixel data claims")
    b = bytearray(nat)
    pn = b.find(b"\x10\x00\x10\x00PN")
    struct.pack_into("<H", b, pn + 6, 0xFFF0)  # PatientName length larger than the rest of the header
    put("name_length_huge", bytes(b), "ImageError", "")

    ds = pydicom.dcmread(native)
    ds.PixelData = ds.PixelData[:-1000]
    ds.save_as(d / "short_pixels.dcm")
    cases["short_pixels"] = (d / "short_pixels.dcm", "ImageError", "pixel data is")
    ds = pydicom.dcmread(native)
    ds.PixelData = ds.PixelData + b"\0" * 4096
    ds.save_as(d / "long_pixels.dcm")
    cases["long_pixels"] = (d / "long_pixels.dcm", "ImageError", "pixel data is")
    ds = pydicom.dcmread(real)
    ds.Rows = ds.Rows + 100  # RLE stream shorter than the header says
    ds.save_as(d / "rle_rows.dcm")
    cases["rle_rows"] = (d / "rle_rows.dcm", "ImageError", "cannot decode pixel data")
    ds = pydicom.dcmread(real)
    del ds.PixelData
    ds.save_as(d / "no_pixels.dcm")
    cases["no_pixels"] = (d / "no_pixels.dcm", "ImageError", "no pixel data")
    ds = pydicom.dcmread(real, stop_before_pixels=True)
    del ds.Rows, ds.Columns
    ds.save_as(d / "no_rows.dcm")
    cases["no_rows"] = (d / "no_rows.dcm", "ImageError", "Rows/Columns")
    ds = pydicom.dcmread(real)
    ds.Modality = "CT"
    ds.save_as(d / "ct.dcm")
    cases["modality_ct"] = (d / "ct.dcm", "ImageError", "modality CT is not a mammogram")
    ds = pydicom.dcmread(native)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(d / "two_frames.dcm")
    cases["multi_frame"] = (d / "two_frames.dcm", "ImageError", "multi-frame")
    ds = pydicom.dcmread(real)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 512])
    ds.save_as(d / "jpegls.dcm")
    cases["jpeg_ls_no_plugin"] = (d / "jpegls.dcm", "MissingDecoderError", "pyjpegls")
    ds = pydicom.dcmread(real)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 512])  # a J2K start, then nothing decodable
    ds.save_as(d / "j2k_garbage.dcm")
    cases["j2k_garbage"] = (d / "j2k_garbage.dcm", "ImageError", "cannot decode pixel data")
    ds = pydicom.dcmread(real)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.7"  # a private, unknown syntax
    ds.save_as(d / "unknown_syntax.dcm", implicit_vr=False, little_endian=True)
    cases["unknown_syntax"] = (d / "unknown_syntax.dcm", "MissingDecoderError", "1.2.826.0.1.3680043.9.9999.7")
    ds = pydicom.dcmread(native)
    ds.Rows, ds.Columns = 60000, 60000  # 3.6 Gpx declared, 25 MB present
    ds.save_as(d / "bomb.dcm")
    cases["pixel_bomb"] = (d / "bomb.dcm", "PixelBudgetError", "exceeds the pixel budget")
    return cases


@pytest.fixture(scope="module")
def broken(real_lcc, native_lcc, tmp_path_factory):
    return _broken_copies(real_lcc, native_lcc, tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def broken_results(broken) -> dict[str, dict]:
    names = list(broken)
    results = read_in_subprocess([broken[n][0] for n in names])
    return dict(zip(names, results))


CASES = [
    "empty", "truncated_preamble", "truncated_meta", "truncated_header", "truncated_pixels", "truncated_last_bytes",
    "no_preamble", "no_preamble_no_magic", "not_dicom_text", "not_dicom_random", "pixel_length_past_eof",
    "corrupt_rle", "native_length_past_eof", "name_length_huge", "short_pixels", "long_pixels", "rle_rows",
    "no_pixels", "no_rows", "modality_ct", "multi_frame", "jpeg_ls_no_plugin", "j2k_garbage", "unknown_syntax",
    "pixel_bomb",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_broken_copy_of_real_film_gives_typed_error_naming_the_file(name, broken, broken_results):
    path, etype, phrase = broken[name]
    r = broken_results[name]
    assert r["outcome"] == "error", r
    assert r["type"] == etype, r
    assert r["message"].startswith(f"{path}: "), r  # names the file
    assert phrase in r["message"], r
    assert r["seconds"] < 5, r  # bounded time (the slowest are the RLE decodes that fail, ≈ 0.3 s)
    assert "P_00173" not in r["message"] and "Mass-Test" not in r["message"]


def test_broken_copies_raise_in_process_too(broken):
    path, _, phrase = broken["no_pixels"]
    with pytest.raises(ImageError, match="no pixel data") as e:
        read_image(path)
    assert e.value.path == str(path) and isinstance(e.value, ValueError)
    with pytest.raises(PixelBudgetError):
        read_image(broken["pixel_bomb"][0])
    with pytest.raises(MissingDecoderError, match="JPEG-LS"):
        read_image(broken["jpeg_ls_no_plugin"][0])


def test_the_unbroken_copies_read(real_lcc, native_lcc):
    a, b = read_image(real_lcc), read_image(native_lcc)
    np.testing.assert_array_equal(a.data, b.data)  # RLE and native decode to the same values
    assert a.id == b.id  # same SOP instance → same pseudonym, whatever the encoding


# -- pixel bombs ----------------------------------------------------------------------------------------------------
def _png_bytes(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR (with a recomputed CRC) claims width × height."""
    data = bytearray(_png_bytes(np.zeros((1, 1), np.uint8)))
    ihdr = data.find(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    struct.pack_into(">I", data, ihdr + 17, zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_pixel_bombs_rejected_fast_with_low_memory(tmp_path):
    dcm = tmp_path / "bomb.dcm"
    write_dicom(dcm, np.zeros((4, 4), np.uint16))
    b = bytearray(dcm.read_bytes())
    ds = pydicom.dcmread(dcm)
    ds.Rows, ds.Columns = 65535, 65535  # 4.3 Gpx = 8.6 GB of uint16 declared, 32 bytes present
    ds.save_as(dcm)
    under = tmp_path / "under_budget.dcm"
    ds.Rows, ds.Columns = 7000, 7000  # under the default budget: caught by the length check instead
    ds.save_as(under)
    png = tmp_path / "bomb.png"
    png.write_bytes(_png_with_size(100_000, 100_000))
    small = tmp_path / "budget.png"
    small.write_bytes(_png_bytes(np.zeros((100, 100), np.uint8)))
    del b
    res = read_in_subprocess([dcm, under, png, (small, {"max_pixels": 9_999})])
    assert [r["type"] for r in res] == ["PixelBudgetError", "ImageError", "PixelBudgetError", "PixelBudgetError"]
    assert "pixel data is 32 bytes" in res[1]["message"]
    for r in res:
        assert r["seconds"] < 1.0, r
        assert r["peak_mb"] < 400, r  # the interpreter with numpy, pydicom and pillow: nothing image-sized
        assert r["growth_mb"] < 20, r  # reading the bomb allocates next to nothing


# -- decoders -------------------------------------------------------------------------------------------------------
def _j2k_dicom(path: Path, px: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG2000", irreversible=False, no_jp2=True)  # lossless J2K codestream
    write_dicom(path, px)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([buf.getvalue()])
    ds.save_as(path)
    return path


def test_jpeg2000_round_trip_decodes_exactly_with_plugin(tmp_path):
    px = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 13)[:, ::-1].copy()  # brighter on the left
    img = read_image(_j2k_dicom(tmp_path / "j2k.dcm", px))
    np.testing.assert_array_equal(img.data, px.astype(np.float32))


def test_rle_round_trip(tmp_path):
    px = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 13)[:, ::-1].copy()
    p = write_dicom(tmp_path / "rle.dcm", px)
    ds = pydicom.dcmread(p)
    ds.compress(RLELossless)
    ds.save_as(p)
    np.testing.assert_array_equal(read_image(p).data, px.astype(np.float32))


def test_jpeg2000_without_its_plugin_names_the_missing_decoder(tmp_path):
    px = np.full((32, 32), 500, np.uint16)
    p = _j2k_dicom(tmp_path / "j2k.dcm", px)
    # pillow blocked before pydicom registers its plugins: pydicom then has no JPEG 2000 decoder at all
    (r,) = read_in_subprocess([p], prelude="sys.modules['PIL'] = None")
    assert r["type"] == "MissingDecoderError", r
    assert "JPEG 2000" in r["message"] and "1.2.840.10008.1.2.4.90" in r["message"]
    assert "pylibjpeg-openjpeg" in r["message"] and "pillow" in r["message"]


# -- PNG / TIFF faults ----------------------------------------------------------------------------------------------
def test_unreadable_png_and_tiff(tmp_path):
    good = _png_bytes((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    cases = {
        "signature_only.png": good[:8],
        "truncated.png": good[: len(good) // 2],
        "garbage.png": good[:8] + b"\x00" * 200,
        "bad_crc.png": good[:30] + bytes([good[30] ^ 0xFF]) + good[31:],
        "truncated.tif": b"II*\x00" + b"\x08\x00\x00\x00" + b"\x00" * 10,
    }
    paths = []
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    for path, r in zip(paths, read_in_subprocess(paths)):
        assert r["outcome"] == "error" and r["type"] == "ImageError", (path.name, r)
        assert r["message"].startswith(f"{path}: ") and "unreadable" in r["message"], r
    with pytest.raises(ImageError, match="multi-frame TIFF"):
        frames = [Image.fromarray(np.zeros((8, 8), np.uint8)) for _ in range(2)]
        frames[0].save(tmp_path / "two.tif", save_all=True, append_images=frames[1:])
        read_image(tmp_path / "two.tif")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="cannot open"):
        read_image(tmp_path / "nope.dcm")
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path)


# -- patient identifiers never leave the module (RELIABILITY.md item 5) ----------------------------------------------
SENTINELS = {
    "name": "ZQXSENTINELNAME",
    "id": "ZQXSENTINELID",
    "private": "ZQXSENTINELPRIVATE",
    "sequence": "ZQXSENTINELSEQ",
    "description": "ZQXSENTINELDESC",
    "other": "ZQXSENTINELOTHER",
    "birth": "ZQXSENTINELBIRTH",
    "field": "ZQXSENTINELFIELD",
}


def _with_sentinels(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.PatientName = f"{SENTINELS['name']}^Jane"
    ds.PatientID = SENTINELS["id"]
    ds.StudyDescription = SENTINELS["description"]
    ds.SeriesDescription = f"screening {SENTINELS['description']}"
    ds.OtherPatientNames = SENTINELS["other"]
    ds.add_new(0x00100030, "DA", SENTINELS["birth"])  # an invalid date: pydicom warns, quoting the value
    block = ds.private_block(0x0011, "ZQX PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", SENTINELS["private"])
    item = pydicom.Dataset()
    item.PatientID = SENTINELS["sequence"]
    item.IssuerOfPatientID = SENTINELS["sequence"]
    ds.OtherPatientIDsSequence = [item]
    return ds


def _sentinel_files(real: Path, native: Path, d: Path) -> list[tuple[Path, dict]]:
    """One file per error path (and one good file), all carrying every sentinel."""
    out = []

    def save(name, ds, **kw):
        p = d / f"{name}.dcm"
        _with_sentinels(ds).save_as(p)
        out.append((p, kw))
        return p

    save("good", pydicom.dcmread(native))
    ds = pydicom.dcmread(native)
    ds.Modality = "CT"
    save("ct", ds)
    ds = pydicom.dcmread(native)
    del ds.PixelData
    save("no_pixels", ds)
    ds = pydicom.dcmread(native)
    ds.PixelData = ds.PixelData[:-100]
    save("short", ds)
    save("budget", pydicom.dcmread(native), max_pixels=1000)
    ds = pydicom.dcmread(real)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 64])
    save("no_decoder", ds)
    ds = pydicom.dcmread(real)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + SENTINELS["name"].encode() * 8])
    save("bad_j2k", ds)
    ds = pydicom.dcmread(native)
    ds.NumberOfFrames = 3
    save("frames", ds)
    ds = pydicom.dcmread(native)
    ds.Modality = SENTINELS["field"]  # a hostile file may put a name in any field the reader looks at
    save("modality_field", ds)
    ds = pydicom.dcmread(native)
    ds.PhotometricInterpretation = SENTINELS["field"]
    save("photometric_field", ds)
    ds = pydicom.dcmread(native)
    ds.ViewPosition = SENTINELS["field"].lower()  # invalid CS (lower case): pydicom would log it if it converted it
    ds.Laterality = SENTINELS["field"].lower()
    save("view_field", ds)
    p = save("truncated", pydicom.dcmread(native))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 5000])
    p = save("name_length", pydicom.dcmread(native))
    b = bytearray(p.read_bytes())
    pn = b.find(b"\x10\x00\x10\x00PN")
    struct.pack_into("<H", b, pn + 6, 0x7FF0)
    p.write_bytes(bytes(b))
    p = save("broken_sequence", pydicom.dcmread(native))
    b = bytearray(p.read_bytes())
    sq = b.find(b"\x10\x00\x02\x10SQ")  # OtherPatientIDsSequence: lengths past the end of the file
    struct.pack_into("<I", b, sq + 8, 0x7FFFFFF0)
    struct.pack_into("<I", b, sq + 16, 0x7FFFFFF0)
    p.write_bytes(bytes(b))
    return out


def test_sentinel_identifiers_never_appear_in_messages_logs_or_repr(real_lcc, native_lcc, tmp_path, caplog, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing invalid values on purpose: pydicom's warnings belong to the setup
        files = _sentinel_files(real_lcc, native_lcc, tmp_path)
    caplog.clear()  # writing the files made pydicom warn about the invalid date: that was the test, not us
    seen: list[str] = []
    outcomes = {}
    caplog.set_level(logging.DEBUG)  # every logger, pydicom's included
    logging.getLogger("pydicom").setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for path, kw in files:
                try:
                    img = read_image(path, **kw)
                    outcomes[path.stem] = "image"
                    seen += [repr(img), str(img), img.id, repr(img.voi), str(img.__dict__.get("path"))]
                except ImageError as e:
                    outcomes[path.stem] = type(e).__name__
                    seen += [str(e), repr(e), e.reason, repr(e.args)]
                    ctx = e.__context__
                    seen += [repr(ctx)] if ctx is not None and not e.__suppress_context__ else []
    finally:
        logging.getLogger("pydicom").setLevel(logging.WARNING)
    seen += [str(w.message) for w in caught]
    seen += [r.getMessage() for r in caplog.records]
    out = capsys.readouterr()
    seen += [out.out, out.err]
    assert outcomes["good"] == "image" and outcomes["view_field"] == "image"
    assert outcomes["budget"] == "PixelBudgetError" and outcomes["no_decoder"] == "MissingDecoderError"
    others = {k: v for k, v in outcomes.items() if k not in ("good", "view_field", "budget", "no_decoder")}
    assert set(others.values()) == {"ImageError"}, outcomes
    assert len(caplog.records) > 0  # the log was really captured (read_image logs at debug level)
    text = "\n".join(seen).upper()
    for what, sentinel in SENTINELS.items():
        assert sentinel not in text, f"{what} sentinel leaked"
    # the same in a subprocess with pydicom's own debug logging switched on, stderr captured
    prelude = "import logging; logging.basicConfig(level=logging.DEBUG); import pydicom; pydicom.config.debug(True)"
    code = READER.format(limit=MEMORY_LIMIT, root=str(ROOT), prelude=prelude)
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps([[str(p), kw] for p, kw in files]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.count("\n") == len(files), proc.stderr[-2000:]
    assert '"outcome": "crash"' not in proc.stdout
    leaked = [s for s in SENTINELS.values() if s in proc.stdout]
    assert not leaked, leaked
    # pydicom's own debug log (not ours) does print raw element values: we only promise our messages and logs
    ours = [line for line in proc.stderr.splitlines() if "store.images" in line]
    assert ours and not [s for s in SENTINELS.values() if any(s in line for line in ours)]


# -- fuzzing --------------------------------------------------------------------------------------------------------
FUZZ = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from hypothesis import given, settings, strategies as st, HealthCheck
    from store.images import read_image, MedicalImage
    from store.errors import ImageError
    seed = Path({seed!r}).read_bytes()
    work = Path({work!r})
    slowest = [0.0]
    counts = {{"image": 0, "error": 0}}

    @settings(max_examples={examples}, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, {span} - 1), st.integers(1, 255)), min_size=1, max_size=8),
           st.integers(0, 3))
    def fuzz(flips, cut):
        data = bytearray(seed)
        for pos, x in flips:
            data[pos] ^= x
        if cut:  # sometimes also cut the tail
            data = data[: len(data) - cut * 37]
        p = work / "fuzz.dcm"
        p.write_bytes(bytes(data))
        t = time.perf_counter()
        try:
            out = read_image(p)
            assert isinstance(out, MedicalImage) and out.data.ndim == 2
            counts["image"] += 1
        except ImageError as e:
            assert str(e).startswith(str(p) + ": ")
            counts["error"] += 1
        slowest[0] = max(slowest[0], time.perf_counter() - t)

    fuzz()
    print("COUNTS", counts["image"], counts["error"])
    print("SLOWEST", slowest[0])
    """
)


def test_fuzzed_dicom_headers_give_an_image_or_an_image_error(tmp_path):
    px = np.zeros((24, 24), np.uint16)
    px[:, :10] = 3000
    seed = write_dicom(
        tmp_path / "seed.dcm", px, WindowCenter=1500, WindowWidth=3000, Laterality="L", PatientOrientation="CC",
        RescaleSlope=1, RescaleIntercept=0,
    )  # fmt: skip
    span = len(seed.read_bytes()) - 24 * 24 * 2  # flip bytes in the preamble, meta and header, not the pixels
    code = FUZZ.format(limit=MEMORY_LIMIT, root=str(ROOT), seed=str(seed), work=str(tmp_path), examples=300, span=span)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    slowest = float(proc.stdout.split("SLOWEST")[1])
    images, errors = map(int, proc.stdout.split("COUNTS")[1].split()[:2])
    assert slowest < 2.0
    assert images > 10 and errors > 10, (images, errors)  # the flips reach both outcomes
