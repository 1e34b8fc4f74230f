"""Image files to sizes and pixels (`pipeline.sources.decode`): any mode and bit depth to 8-bit RGB, EXIF
orientation applied to the size and the pixels, large images decoded once and small, in original coordinates
all the same, decompression bombs still refused. The audits run the shipped model on synthetic val images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run_ok
from PIL import ExifTags, Image, ImageOps
from pictures import png16

from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.sources import CocoSource, ErrorReason, FolderSource, ImageRecord, SourceError
from eive_audit.pipeline.sources.decode import decode_rgb, display_size, fit_size
from eive_audit.storage.catalog import query

ORIENTATION = ExifTags.Base.Orientation


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _quadrants(width: int = 40, height: int = 30) -> np.ndarray:
    """An RGB image whose four quadrants differ, so any flip or rotation shows."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (250, 10, 10)
    pixels[: height // 2, width // 2:] = (10, 250, 10)
    pixels[height // 2:, : width // 2] = (10, 10, 250)
    pixels[height // 2:, width // 2:] = (250, 250, 10)
    return pixels


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- modes and bit depths


def test_16_bit_pngs_keep_their_top_8_bits_in_every_colour_type(tmp_path: Path) -> None:
    """40000 / 257 = 155.6 and 40000 >> 8 = 156: either is right, 255 (clipping) or 40000 / 255 is not."""
    value = 40000
    for channels, name in ((1, "gray"), (2, "gray_alpha"), (3, "rgb"), (4, "rgba")):
        shape = (6, 8) if channels == 1 else (6, 8, channels)
        path = tmp_path / f"{name}.png"
        path.write_bytes(png16(np.full(shape, value, np.uint16)))
        pixels = _hwc(decode_rgb(path, None))
        assert pixels.shape == (6, 8, 3)
        assert np.abs(pixels.astype(int) - value // 257).max() <= 1, (name, Image.open(path).mode, pixels[0, 0])


def test_every_pillow_mode_becomes_8_bit_rgb(tmp_path: Path) -> None:
    """Wide integer modes on the 16-bit range, float on [0, 1], the rest as Pillow converts them."""
    gray16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)  # up to 61100
    cases = {
        "I;16.png": (Image.fromarray(gray16), gray16 >> 8),
        "I.tif": (Image.fromarray(gray16.astype(np.int32)), gray16 >> 8),
        "F.tif": (Image.fromarray(gray16.astype(np.float32) / 65535), np.rint(gray16 / 65535 * 255)),
        "L.png": (Image.fromarray((gray16 >> 8).astype(np.uint8)), gray16 >> 8),
        "LA.png": (Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("LA"), gray16 >> 8),
        "P.png": (Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("P"), None),
        "1.png": (Image.fromarray(gray16 >= 30000), np.where(gray16 >= 30000, 255, 0)),
    }
    for name, (image, expected) in cases.items():
        path = tmp_path / name
        image.save(path)
        with Image.open(path) as reopened:
            assert reopened.mode == name.split(".")[0], (name, reopened.mode)
        pixels = _hwc(decode_rgb(path, None)).astype(int)
        assert pixels.shape == (6, 8, 3), name
        if expected is not None:
            assert np.abs(pixels - np.asarray(expected)[..., None]).max() <= 1, (name, pixels[..., 0], expected)
    assert np.abs(_hwc(decode_rgb(tmp_path / "P.png", None)).astype(int) - (gray16 >> 8)[..., None]).max() <= 8
    colour = Image.fromarray(_quadrants())
    colour.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(_hwc(decode_rgb(tmp_path / "cmyk.jpg", None)).astype(int) - _quadrants()).max() <= 12


def test_an_audit_of_16_bit_pngs_finds_what_the_8_bit_audit_finds(synth: Path, tmp_path: Path) -> None:
    """The same images as 16-bit RGB PNGs (each value v stored as 257 v): torchvision decoded them to
    uint16 and preprocessing divided by 255, so correct detections became misses."""
    data = json.loads((synth / "annotations" / "val.json").read_text())
    keep = sorted(data["images"], key=lambda image: image["id"])[:6]
    deep = tmp_path / "deep"
    deep.mkdir()
    for entry in keep:
        pixels = np.asarray(Image.open(synth / "images" / "val" / entry["file_name"]).convert("RGB"))
        (deep / entry["file_name"]).write_bytes(png16(pixels.astype(np.uint16) * 257))
    ids = {entry["id"] for entry in keep}
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({**data, "images": keep, "annotations": [a for a in data["annotations"]
                                                                       if a["image_id"] in ids]}))
    common = ["--coco", ann, "--device", "cpu", "--no-findings", "--no-report"]
    rows = [_instances(tmp_path / store, run_ok(*common, "--images", images, "--out", tmp_path / store)["run_id"])
            for images, store in ((synth / "images" / "val", "eight"), (deep, "sixteen"))]
    assert sum(row["outcome"] == "tp" for row in rows[0]) >= 5
    assert rows[1] == rows[0]


def _instances(store: Path, run_id: str, scale: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """The run's instance rows (outcome, label, score, boxes divided by `scale` (x, y), mass_in_gt), sorted."""
    rows = query(store, "SELECT instance_id, outcome, label_name, score, pred_x0, pred_y0, pred_x1, pred_y1, "
                        "gt_x0, gt_y0, gt_x1, gt_y1, mass_in_gt FROM instances WHERE run_id = ? "
                        "ORDER BY instance_id", [run_id]).to_pylist()
    for row in rows:
        for key in [k for k in row if k[:3] in ("pre", "gt_") and row[k] is not None]:
            row[key] = row[key] / scale[0 if key.endswith(("x0", "x1")) else 1]
    return rows


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_applied_as_pillow_transposes_it(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "photo.png"  # lossless, so pixels compare exactly; JPEG below
    Image.fromarray(_quadrants()).save(path, exif=_exif(orientation))
    with Image.open(path) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    width, height, applied = display_size(path)
    assert (height, width) == expected.shape[:2] and applied == orientation
    np.testing.assert_array_equal(_hwc(decode_rgb(path, None)), expected)
    small = decode_rgb(path, 20)
    assert tuple(small.shape[-2:]) == fit_size(width, height, 20)[::-1] and max(small.shape[-2:]) == 20


def test_a_phone_photo_is_sized_and_decoded_as_displayed(tmp_path: Path) -> None:
    """A camera held upright stores 32 x 48 pixels sideways (48 wide) with orientation 6 (rotate 90° clockwise
    to display); its boxes are drawn on the 32 x 48 portrait a viewer shows."""
    upright = _quadrants(32, 48)
    raw = np.rot90(upright, k=1)  # what the sensor stored: the display image turned 90° counter-clockwise
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(raw).save(root / "phone.jpg", exif=_exif(6), quality=100, subsampling=0)  # no colour bleed
    assert display_size(root / "phone.jpg") == (32, 48, 6)
    assert np.abs(_hwc(decode_rgb(root / "phone.jpg", None)).astype(int) - upright).max() <= 8
    folder = [item for item in FolderSource(root) if isinstance(item, ImageRecord)]
    assert [(r.width, r.height, r.exif_orientation) for r in folder] == [(32, 48, 6)]
    ann = tmp_path / "ann.json"  # a box in the bottom rows of the portrait: past the raw image's 32-px height
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "phone.jpg", "width": 32, "height": 48}],
                               "categories": [{"id": 1, "name": "thing"}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 38, 20, 8]}]}))
    items = list(CocoSource(ann, root))
    assert not [item for item in items if isinstance(item, SourceError)], items
    (record,) = items
    assert (record.width, record.height, record.exif_orientation) == (32, 48, 6)


def test_an_audit_of_rotated_files_matches_the_audit_of_upright_ones(synth: Path, tmp_path: Path) -> None:
    """Each image stored turned (by one of orientations 2..8) with the EXIF tag that turns it back, boxes
    in display coordinates: the same rows as the upright files, and `images` records the tag applied."""
    data = json.loads((synth / "annotations" / "val.json").read_text())
    keep = sorted(data["images"], key=lambda image: image["id"])[:7]
    upright_dir, turned_dir = tmp_path / "upright", tmp_path / "turned"
    upright_dir.mkdir()
    turned_dir.mkdir()
    inverse = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # the orientation whose transpose undoes each one
    for k, entry in enumerate(keep):
        with Image.open(synth / "images" / "val" / entry["file_name"]) as source:
            canvas = Image.new("RGB", (192, 128), (128, 128, 128))  # a grey band right: not square
            canvas.paste(source.convert("RGB"), (0, 0))
        canvas.save(upright_dir / entry["file_name"])
        orientation = 2 + k % 7
        turned = ImageOps.exif_transpose(_tagged(canvas, inverse[orientation]))  # stored turned
        turned.save(turned_dir / entry["file_name"], exif=_exif(orientation))
        entry["width"], entry["height"] = 192, 128
    ids = {entry["id"] for entry in keep}
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({**data, "images": keep, "annotations": [a for a in data["annotations"]
                                                                       if a["image_id"] in ids]}))
    common = ["--coco", ann, "--device", "cpu", "--no-findings", "--no-report"]
    runs = {name: run_ok(*common, "--images", folder, "--out", tmp_path / name)["run_id"]
            for name, folder in (("up", upright_dir), ("turned", turned_dir))}
    up, turned = (_instances(tmp_path / name, run_id) for name, run_id in runs.items())
    assert sum(row["outcome"] == "tp" for row in up) >= 5
    assert turned == up
    images = query(tmp_path / "turned", "SELECT image_id, width, height, exif_orientation FROM images "
                                        "ORDER BY image_id").to_pylist()
    assert [(r["width"], r["height"], r["exif_orientation"]) for r in images] == [
        (192, 128, 2 + k % 7) for k in range(len(keep))]
    assert query(tmp_path / "up", "SELECT count(*) AS n FROM images WHERE exif_orientation IS NULL"
                 ).column("n")[0].as_py() == len(keep)


def _tagged(image: Image.Image, orientation: int) -> Image.Image:
    """A copy of `image` carrying EXIF orientation `orientation`, for `ImageOps.exif_transpose` to apply."""
    copy = image.copy()
    copy.info["exif"] = _exif(orientation).tobytes()
    return copy


# ---------------------------------------------------------------- large images, bombs


def test_a_large_jpeg_is_decoded_no_larger_than_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(_quadrants(4000, 3000)).save(path, quality=80)
    assert display_size(path) == (4000, 3000, None)
    for cap in (128, 1333):
        assert tuple(decode_rgb(path, cap).shape) == (3, round(3000 * cap / 4000), cap)
    assert tuple(decode_rgb(path, 5000).shape) == (3, 3000, 4000), "never scaled up"
    record = ImageRecord(image_id=1, path=path, width=4000, height=3000)
    (batch,) = iter_batches([record], 4, 128)
    assert isinstance(batch, ImageBatch) and tuple(batch.images[0].shape) == (3, 96, 128)
    assert batch.sizes == [(3000, 4000)], "sizes stay the original's"


def test_a_decompression_bomb_stays_an_unreadable_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_quadrants(400, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 300 // 3)  # over twice the limit: an error, not a warning
    with pytest.raises(Image.DecompressionBombError):
        decode_rgb(tmp_path / "bomb.png", 128)
    (error,) = FolderSource(tmp_path)
    assert isinstance(error, SourceError) and error.reason == ErrorReason.UNREADABLE_IMAGE
    record = ImageRecord(image_id=1, path=tmp_path / "bomb.png", width=400, height=300)
    (error,) = iter_batches([record], 1, 128)
    assert isinstance(error, SourceError) and error.reason == ErrorReason.UNREADABLE_IMAGE


def test_a_large_image_is_audited_in_original_coordinates(synth: Path, tmp_path: Path) -> None:
    """Each image 192 x 144 (the scene with a grey band) and the same 20.8 times larger, 4000 x 3000, its boxes
    scaled: the model sees the same 128 x 96 input, so the rows agree once the large boxes are scaled back;
    findings and the report run on the large images from the small decoded copies."""
    data = json.loads((synth / "annotations" / "val.json").read_text())
    keep = sorted(data["images"], key=lambda image: image["id"])[:4]
    ids = {entry["id"] for entry in keep}
    scale = 4000 / 192
    for name, size in (("small", (192, 144)), ("large", (4000, 3000))):
        (tmp_path / name).mkdir()
        entries, annotations = [], []
        for entry in keep:
            with Image.open(synth / "images" / "val" / entry["file_name"]) as source:
                canvas = Image.new("RGB", (192, 144), (128, 128, 128))
                canvas.paste(source.convert("RGB"), (0, 0))
            canvas.resize(size, Image.Resampling.BICUBIC).save(tmp_path / name / f"{entry['id']}.jpg", quality=95)
            entries.append({**entry, "file_name": f"{entry['id']}.jpg", "width": size[0], "height": size[1]})
        factor = size[0] / 192
        annotations = [{**a, "bbox": [v * factor for v in a["bbox"]]}
                       for a in data["annotations"] if a["image_id"] in ids]
        (tmp_path / f"{name}.json").write_text(json.dumps({**data, "images": entries, "annotations": annotations}))
    runs = {}
    for name in ("small", "large"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            runs[name] = run_ok("--coco", tmp_path / f"{name}.json", "--images", tmp_path / name, "--device", "cpu",
                                "--out", tmp_path / f"store-{name}", "--findings-off-object", "0.3",
                                "--findings-min-support", "2")["run_id"]
    small = _instances(tmp_path / "store-small", runs["small"])
    large = _instances(tmp_path / "store-large", runs["large"], (scale, scale))
    assert sum(row["outcome"] == "tp" for row in small) >= 3
    assert [(r["instance_id"], r["outcome"], r["label_name"]) for r in large] == [
        (r["instance_id"], r["outcome"], r["label_name"]) for r in small]
    # The two inputs differ only by resampling (192 px resized to 128 px here, a 1/8-scale JPEG decode and a
    # resize there); boxes in decoded pixels would be 20 times off.
    for a, b in zip(small, large):
        assert abs(a["score"] - b["score"]) < 0.12, (a, b)
        boxes = [k for k in a if k[:3] in ("pre", "gt_") and a[k] is not None]
        assert max(abs(a[k] - b[k]) for k in boxes) < 2.0, (a, b)  # in small-image pixels
        assert a["mass_in_gt"] is None or abs(a["mass_in_gt"] - b["mass_in_gt"]) < 0.05, (a, b)
    sizes = query(tmp_path / "store-large", "SELECT DISTINCT width, height, input_width, input_height FROM images")
    assert sizes.to_pylist() == [{"width": 4000, "height": 3000, "input_width": 128, "input_height": 96}]
    report = (tmp_path / "store-large" / "reports" / f"{runs['large']}.html").read_text()
    assert '<figure class="failure' in report and "image unavailable" not in report
    verified = query(tmp_path / "store-large", "SELECT count(*) AS n FROM instances "
                                               "WHERE verification_drop IS NOT NULL").column("n")[0].as_py()
    assert verified > 0, "findings re-scored the large images"


# ---------------------------------------------------------------- decoding ahead of the forward


def test_decoding_on_threads_keeps_every_error_and_the_streams_order(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Good files, corrupt files and the source's own errors, interleaved; decode times reversed (the first
    file is the slowest), so threads finish out of order: the batches and errors come in stream order,
    exactly as decoded in one thread, and no more than two batches are decoded ahead of the consumer."""
    import threading
    import time

    from eive_audit.pipeline import batching

    stream: list[ImageRecord | SourceError] = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        if i % 4 == 3:
            path.write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(np.full((8 + i, 10, 3), i, np.uint8)).save(path)
        stream.append(ImageRecord(image_id=i, path=path, width=10, height=8 + i))
        if i % 5 == 2:
            stream.append(SourceError(i, ErrorReason.MALFORMED_ANNOTATION, f"annotation of {i}", str(path)))
    decode, started, lock = batching.decode_rgb, [], threading.Lock()

    def slow_decode(path: Path, max_side: int | None) -> torch.Tensor:
        with lock:
            started.append(int(path.stem))
        time.sleep(0.02 * (12 - int(path.stem)))
        return decode(path, max_side)

    def outline(items: list) -> list:
        return [(type(item).__name__, [r.image_id for r in item.records], [int(x[0, 0, 0]) for x in item.images])
                if isinstance(item, ImageBatch) else (item.reason.value, item.image_id, item.message[:9])
                for item in items]

    one_thread = outline(list(iter_batches(stream, 3, None)))
    monkeypatch.setattr(batching, "decode_rgb", slow_decode)
    consumed = iter_batches(stream, 3, None, decode_workers=4)
    first = next(consumed)
    assert len(started) <= 2 * 3 + 4, "decoding runs at most two batches (and the pool's width) ahead"
    threaded = outline([first, *consumed])
    assert threaded == one_thread
    assert [kind for kind, *_ in one_thread].count("unreadable_image") == 3
    assert [kind for kind, *_ in one_thread].count("malformed_annotation") == 2
    assert one_thread[:2] == [("ImageBatch", [0, 1, 2], [0, 1, 2]), ("malformed_annotation", 2, "annotatio")]
