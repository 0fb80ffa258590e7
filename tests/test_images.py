"""store.images on the 8 real CBIS-DDSM films and on synthetic ramps with hand-computed display values."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers_images import raw_pixels, write_dicom
from store.errors import ImageError
from store.images import MedicalImage, pseudonym, read_image, window_linear, window_sigmoid


# -- the real films -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_images(real_dicoms) -> list[tuple[object, MedicalImage]]:
    return [(p, read_image(p)) for p in real_dicoms]


@pytest.fixture(scope="module")
def headers(real_dicoms) -> dict:
    return {p: pydicom.dcmread(p, stop_before_pixels=True) for p in real_dicoms}


def test_all_real_films_decode_with_header_shape_and_tags(real_images, headers):
    for path, img in real_images:
        hdr = headers[path]
        assert img.format == "dicom" and img.modality == "MG"
        assert img.data.dtype == np.float32 and img.shape == (hdr.Rows, hdr.Columns)
        assert img.laterality == hdr.Laterality  # CBIS-DDSM keeps it in (0020,0060)
        assert img.view == str(hdr.PatientOrientation) and img.view in ("CC", "MLO")
        assert img.bits_stored == 16
        assert img.data.max() > 30000  # 16-bit range kept, not squashed to 8 bit
        assert len(np.unique(img.data[::7, ::7])) > 1000


def test_real_films_keep_exact_stored_values_and_map_back_to_source(real_images):
    for path, img in real_images[:4]:
        raw = raw_pixels(path)  # (y, x) uint16 straight from pydicom
        expected = raw[:, ::-1] if img.flipped else raw
        np.testing.assert_array_equal(img.data, expected.astype(np.float32))
        h, w = img.shape
        for x, y in [(0, 0), (w - 1, 17), (123, h - 1), (w // 2, h // 3)]:
            sx, sy = img.to_source_xy(x, y)
            assert img.data[y, x] == raw[int(sy), int(sx)]
            assert img.from_source_xy(sx, sy) == (x, y)


def test_orientation_puts_chest_wall_left_on_every_real_film(real_images):
    for path, img in real_images:
        d = img.display(scale=0.1)
        h, w = d.shape
        left, right = d[:, : w // 10].mean(), d[:, -w // 10 :].mean()
        assert left > 3 * right, f"{path}: tissue left {left:.3f} vs right {right:.3f}"
        # CBIS-DDSM stores right breasts chest wall right: the tissue evidence agrees with the laterality convention
        assert img.flipped == (img.laterality == "R")
        assert img.orientation_source == "tissue"


def test_windowed_display_of_real_films_is_sane(real_images):
    from store.segment import segment_breast

    for path, img in real_images:
        d = img.display(scale=0.2)
        assert d.dtype == np.float32 and d.min() >= 0.0 and d.max() <= 1.0
        seg = segment_breast(d, view=img.view)
        breast, background = d[seg.breast], d[seg.background]
        assert breast.mean() > background.mean() + 0.25, path
        assert (breast >= 0.999).mean() < 0.05, f"{path}: breast saturated"
        assert (breast <= 0.001).mean() < 0.02, f"{path}: breast crushed to black"
        assert np.median(background) < 0.05


def test_display_scale_is_area_averaging(real_images):
    _, img = real_images[1]
    full = img.display()
    half = img.display(scale=0.5)
    assert half.shape == img.display_shape(0.5) == (round(img.shape[0] / 2), round(img.shape[1] / 2))
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    blocks = full[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # (y, x) exact 2×2 means
    np.testing.assert_allclose(half[: h // 2, : w // 2], blocks, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        img.display(scale=0)


def test_pseudonymous_ids_are_stable_distinct_and_anonymous(real_images, headers):
    ids = [img.id for _, img in real_images]
    assert len(set(ids)) == 8 and all(i.startswith("img-") and len(i) == 16 for i in ids)
    for path, img in real_images:
        assert read_image(path).id == img.id  # same file → same id
        assert read_image(path, salt="other-project").id != img.id
        hdr = headers[path]
        assert img.id == pseudonym("dicom", hdr.SOPInstanceUID, hdr.StudyInstanceUID)
        name = str(hdr.PatientName)  # like Mass-Test_P_00173_LEFT_CC
        number = name.split("_")[2]  # the patient number, e.g. 00173
        text = repr(img) + img.id + str(img.path.name)
        for piece in (name, str(hdr.PatientID), f"P_{number}", number):
            assert piece not in text, path
    # across machines and runs: the id depends only on the salt and the UIDs (pinned for one film)
    lcc = next(img for p, img in real_images if p.name == "1-130.dcm")
    assert lcc.id == "img-6f73bff3dcbc"


# -- windowing on synthetic ramps (hand-computed expectations) --------------------------------------------------------
def ramp(n: int = 100, dtype=np.uint16) -> np.ndarray:
    return np.arange(n, dtype=dtype).reshape(10, n // 10)  # (y, x): value = 10·y + x


def test_linear_window_matches_the_dicom_formula(tmp_path):
    # c=50, w=11: x <= 44.5 → 0, x > 54.5 → 1, else (x − 49.5)/10 + 0.5
    img = read_image(write_dicom(tmp_path / "a.dcm", ramp(), WindowCenter=50, WindowWidth=11), orient=False)
    d = img.display()
    assert d[4, 4] == 0.0 and d[5, 5] == 1.0  # 44 and 55
    np.testing.assert_allclose(d[4, 5:], [0.05, 0.15, 0.25, 0.35, 0.45], atol=1e-6)
    np.testing.assert_allclose(d[5, :5], [0.55, 0.65, 0.75, 0.85, 0.95], atol=1e-6)
    assert img.window == (50.0, 11.0) and not img.invert


def test_several_windows_use_the_first(tmp_path):
    p = write_dicom(tmp_path / "b.dcm", ramp(), WindowCenter=[50, 1000], WindowWidth=[11, 2000])
    d = read_image(p, orient=False).display()
    assert d[4, 7] == pytest.approx(0.25, abs=1e-6)


def test_linear_exact_and_sigmoid(tmp_path):
    p = write_dicom(tmp_path / "e.dcm", ramp(), WindowCenter=50, WindowWidth=10, VOILUTFunction="LINEAR_EXACT")
    d = read_image(p, orient=False).display()
    np.testing.assert_allclose([d[4, 5], d[4, 8], d[5, 0], d[5, 5]], [0.0, 0.3, 0.5, 1.0], atol=1e-6)
    p = write_dicom(tmp_path / "s.dcm", ramp(), WindowCenter=50, WindowWidth=10, VOILUTFunction="SIGMOID")
    d = read_image(p, orient=False).display()
    # 1 / (1 + exp(−4 (x − 50) / 10)): x=50 → 0.5, x=55 → 1/(1+e^−2), x=45 → 1/(1+e^2)
    np.testing.assert_allclose([d[5, 0], d[5, 5], d[4, 5]], [0.5, 0.8807971, 0.1192029], atol=1e-6)
    assert (np.diff(d.ravel()[30:71]) > 0).all()  # no clipping inside c ± 2w (float32 rounds to 1 further out)


def test_monochrome1_inverts_after_windowing(tmp_path):
    p = write_dicom(
        tmp_path / "m1.dcm", ramp(), WindowCenter=50, WindowWidth=11, PhotometricInterpretation="MONOCHROME1"
    )
    img = read_image(p, orient=False)
    d = img.display()
    assert img.invert
    # window first (x=47 → 0.25), then invert → 0.75; inverting the stored values first would give 1.0 here
    assert d[4, 7] == pytest.approx(0.75, abs=1e-6)
    assert d[0, 0] == 1.0 and d[9, 9] == 0.0


def test_presentation_lut_inverse(tmp_path):
    p = write_dicom(tmp_path / "inv.dcm", ramp(), WindowCenter=50, WindowWidth=11, PresentationLUTShape="INVERSE")
    assert read_image(p, orient=False).display()[4, 7] == pytest.approx(0.75, abs=1e-6)
    # MONOCHROME1 with INVERSE is the standard MG "for presentation" pairing: inverted once, not twice
    p = write_dicom(
        tmp_path / "m1inv.dcm", ramp(), WindowCenter=50, WindowWidth=11, PresentationLUTShape="INVERSE",
        PhotometricInterpretation="MONOCHROME1",
    )
    assert read_image(p, orient=False).display()[4, 7] == pytest.approx(0.75, abs=1e-6)


def test_rescale_then_window(tmp_path):
    # stored x → 2x − 100; window c=0, w=21 on modality values: stored 47 → −6 → (−6 + 0.5)/20 + 0.5 = 0.225
    p = write_dicom(
        tmp_path / "r.dcm", ramp(), RescaleSlope=2, RescaleIntercept=-100, WindowCenter=0, WindowWidth=21
    )
    img = read_image(p, orient=False)
    np.testing.assert_array_equal(img.data, ramp().astype(np.float32) * 2 - 100)
    assert img.display()[4, 7] == pytest.approx(0.225, abs=1e-6)


def test_signed_pixels_and_bits_stored(tmp_path):
    px = (ramp().astype(np.int16) - 50)  # −50 … 49
    img = read_image(write_dicom(tmp_path / "s16.dcm", px, WindowCenter=0, WindowWidth=11), orient=False)
    np.testing.assert_array_equal(img.data, px.astype(np.float32))
    assert img.display()[5, 2] == pytest.approx(0.75, abs=1e-6)  # x = 2 → (2 + 0.5)/10 + 0.5


def test_voi_lut_sequence(tmp_path):
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first input 10, 8-bit output
    item.LUTData = np.array([0, 85, 170, 255], "<u2").tobytes()  # OW: one 16-bit word per entry
    p = write_dicom(tmp_path / "lut.dcm", ramp(), VOILUTSequence=[item], WindowCenter=0, WindowWidth=1)
    img = read_image(p, orient=False)
    d = img.display()
    assert img.voi.kind == "LUT"  # the table wins over the window
    np.testing.assert_allclose(d[0, :], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(d[1, :4], [0, 85 / 255, 170 / 255, 1.0], atol=1e-6)
    assert (d[2:] == 1.0).all()


def test_no_window_uses_robust_percentiles(tmp_path):
    px = np.zeros((100, 100), np.uint16)
    px[:, :60] = np.linspace(1000, 3000, 60, dtype=np.uint16)[None, :]  # tissue, chest wall left
    px[5, 90] = 65535  # one saturated marker pixel must not set the window
    img = read_image(write_dicom(tmp_path / "p.dcm", px), orient=False)
    d = img.display()
    assert img.window is None and img.voi is None
    assert d[0, 70] == 0.0 and d[0, 59] > 0.95 and d[0, 0] < 0.4
    assert 0.6 < d[0, 30] / d[0, 59] < 0.9


def test_window_override_and_window_functions():
    np.testing.assert_allclose(window_linear(np.array([44, 47, 55]), 50, 11), [0, 0.25, 1])
    np.testing.assert_allclose(window_sigmoid(np.array([50.0]), 50, 100), [0.5])


def test_explicit_window_override(tmp_path):
    img = read_image(write_dicom(tmp_path / "o.dcm", ramp(), WindowCenter=0, WindowWidth=2), orient=False)
    assert img.display(window=(50, 11))[4, 7] == pytest.approx(0.25, abs=1e-6)


# -- orientation on synthetic images --------------------------------------------------------------------------------
def _half(side: str) -> np.ndarray:
    px = np.zeros((64, 64), np.uint16)
    if side == "L":
        px[:, :24] = 2000
    else:
        px[:, -24:] = 2000
    return px


def test_tissue_decides_orientation_when_no_direction_is_given(tmp_path):
    img = read_image(write_dicom(tmp_path / "r.dcm", _half("R"), Laterality="L"), orient=True)
    assert img.flipped and img.orientation_source == "tissue"
    assert img.data[:, :24].min() == 2000 and img.data[:, 24:].max() == 0
    assert img.to_source_xy(0, 5) == (63, 5)
    assert not read_image(write_dicom(tmp_path / "l.dcm", _half("L")), orient=True).flipped


def test_patient_orientation_row_direction_wins(tmp_path):
    # rows run posterior → chest wall on the right, whatever the pixels say
    img = read_image(write_dicom(tmp_path / "po.dcm", _half("L"), PatientOrientation=["P", "L"]))
    assert img.flipped and img.orientation_source == "patient_orientation"
    img = read_image(write_dicom(tmp_path / "pa.dcm", _half("R"), PatientOrientation=["A", "R"]))
    assert not img.flipped


def test_laterality_decides_when_tissue_is_ambiguous(tmp_path):
    px = np.full((64, 64), 1000, np.uint16)
    img = read_image(write_dicom(tmp_path / "u.dcm", px, ImageLaterality="R"))
    assert img.flipped and img.orientation_source == "laterality" and img.laterality == "R"


# -- PNG and TIFF ---------------------------------------------------------------------------------------------------
def test_png_8_bit_is_display_ready(tmp_path):
    px = np.zeros((40, 60), np.uint8)
    px[:, :30] = np.arange(30, dtype=np.uint8)[None, :] * 8  # tissue on the left
    Image.fromarray(px).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.format == "png" and not img.flipped and img.bits_stored == 8
    np.testing.assert_allclose(img.display(), px / 255.0, atol=1e-6)
    assert read_image(tmp_path / "a.png").id == img.id and img.id.startswith("img-")


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_png_and_tiff_keep_precision_and_orient(tmp_path, suffix):
    px = np.zeros((40, 60), np.uint16)
    px[:, -30:] = 40000 + np.arange(30, dtype=np.uint16)[None, :]  # tissue on the right → flipped
    Image.fromarray(px).save(tmp_path / f"b.{suffix}")
    img = read_image(tmp_path / f"b.{suffix}")
    assert img.format == ("png" if suffix == "png" else "tiff") and img.bits_stored == 16
    assert img.flipped
    np.testing.assert_array_equal(img.data, px[:, ::-1].astype(np.float32))
    d = img.display()
    assert d.min() == 0.0 and d.max() == 1.0 and d[0, 0] > d[0, 29]


def test_same_pixels_different_files_get_different_ids(tmp_path):
    px = _half("L").astype(np.uint8)
    Image.fromarray(px).save(tmp_path / "a.png")
    Image.fromarray(px).save(tmp_path / "b.tif")
    assert read_image(tmp_path / "a.png").id != read_image(tmp_path / "b.tif").id


def test_modality_override(tmp_path):
    p = write_dicom(tmp_path / "dx.dcm", ramp(), Modality="DX")
    with pytest.raises(ImageError, match="modality DX"):
        read_image(p)
    assert read_image(p, allow_modalities=("MG", "DX")).modality == "DX"
    assert read_image(p, allow_modalities=None).modality == "DX"
