"""The bad-input corpus: every kind of broken input an audit meets, one table entry per kind.

Row kinds (ROW_KINDS) must leave `errors` rows, or be audited, while the run goes on: all of them go into
one COCO dataset beside four good synthetic images, audited once by the real CLI with the shipped model.
Each kind then checks its own rows, and the good images must come out exactly as in a clean run of them
alone (batch size 1, so no image's rows depend on its neighbours). File kinds (FILE_KINDS) are annotation
files that are no COCO dataset at all: each must stop `eive-audit run` with exit 2 and one line, before
anything is written.

Adding a kind is one entry: a builder that adds its files and entries to a `Corpus` and returns the
`Outcome` it must leave.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli import invoke, run_ok
from PIL import Image
from pictures import png16
from typer.testing import CliRunner

from eive_audit.cli import app

from eive_audit.pipeline.sources import ErrorReason
from eive_audit.pipeline.sources.synthetic import generate
from eive_audit.storage.catalog import query

Row = tuple[Any, Any, str]  # an errors row: (image_id, annotation_id, type)
GOOD_BOX = [10, 10, 40, 40]  # xywh, inside every 128x128 picture of the corpus
N_GOOD = 4  # good images, ids 1..N_GOOD, from the synthetic generator
ORPHAN_IMAGE_ID = 999_999
EXCLUDED = {"images": ("shard", "forward_ms", "explain_ms"), "instances": ("shard",)}  # differ between runs


@dataclass
class Corpus:
    """A COCO dataset under construction: files under `root / "images"`, entries in `images` and
    `annotations`, ids from 1000 up (the good images keep 1..N_GOOD)."""

    root: Path
    base: Image.Image  # a good 128x128 picture that bad kinds copy, convert or corrupt
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    host_id: int | None = None

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    def file(self, name: str, content: Image.Image | bytes, **save: Any) -> str:
        """Write an image file (a picture, or raw bytes) under the image root; its file_name."""
        path = self.image_dir / name
        if isinstance(content, Image.Image):
            content.save(path, **save)
        else:
            path.write_bytes(content)
        return name

    def link(self, name: str, target: Path) -> str:
        (self.image_dir / name).symlink_to(target)
        return name

    def image(self, file_name: object, size: tuple[Any, Any] = (128, 128), **entry: Any) -> int:
        """An entry of `images` (declared size `size`); its id."""
        image_id = entry.pop("id", None) or next(self.ids)
        self.images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1], **entry})
        return image_id

    def picture(self, name: str, picture: Image.Image, **save: Any) -> int:
        """A readable image file with an entry declaring its true size; its id."""
        return self.image(self.file(name, picture, **save), picture.size)

    def annotation(self, image_id: Any, bbox: Any = None, category_id: Any = 1, **entry: Any) -> int:
        ann_id = entry.pop("id", None) or next(self.ids)
        self.annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                 "bbox": list(GOOD_BOX) if bbox is None else bbox, "area": 1600, "iscrowd": 0,
                                 **entry})
        return ann_id

    def host(self, **bad: Any) -> tuple[int, int]:
        """An annotation made with `bad` on the host, a good picture with one good box that every annotation
        kind shares (fewer images to audit): (the host's id, the annotation's id)."""
        if self.host_id is None:
            self.host_id = self.picture("host.png", self.base)
            self.annotation(self.host_id)
        return self.host_id, self.annotation(self.host_id, **bad)


@dataclass(frozen=True)
class Outcome:
    """What a kind leaves: its errors rows exactly, the images it leaves audited (id -> GT boxes kept) and
    the images it leaves with status `error`."""

    errors: tuple[Row, ...] = ()
    audited: dict[int, int] = field(default_factory=dict)
    failed: tuple[int, ...] = ()


def image_error(image_id: int, kind: str, copies: int = 1) -> Outcome:
    return Outcome(((image_id, None, kind),) * copies, failed=(image_id,))


def box_error(made: tuple[int, int], kind: str, copies: int = 1) -> Outcome:
    """The bad annotation is a row; its image is still audited with its one good box (and no other)."""
    image_id, ann_id = made
    return Outcome(((image_id, ann_id, kind),) * copies, audited={image_id: 1})


def audited(image_id: int) -> Outcome:
    return Outcome(audited={image_id: 0})


def _encoded(picture: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _sixteen_bit(c: Corpus, mode: str) -> int:
    """The base picture as a 16-bit PNG in `mode`'s colour type (each value v stored as 257 v)."""
    pixels = np.asarray(c.base.convert(mode), dtype=np.uint16) * 257
    return c.image(c.file(f"deep_{mode.lower()}.png", png16(pixels)))


def _orientation_6() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter
    return exif


def _exif_turned(c: Corpus) -> int:
    """A JPEG whose EXIF shows its 128x96 pixels a quarter turned: it declares the 96x128 it displays."""
    return c.image(c.file("turned.jpg", c.base.resize((128, 96)), exif=_orientation_6()), (96, 128))


def _duplicate_image_id(c: Corpus) -> Outcome:
    image_id = c.picture("twin_a.png", c.base)
    c.image(c.file("twin_b.png", c.base), id=image_id)
    c.annotation(image_id)
    return image_error(image_id, "duplicate_image_id", copies=2)


def _duplicate_annotation_id(c: Corpus) -> Outcome:
    image_id, ann_id = c.host()
    c.annotation(image_id, [60, 60, 20, 20], id=ann_id)
    return box_error((image_id, ann_id), "duplicate_annotation_id", copies=2)


def _symlink_loop(c: Corpus) -> int:
    c.link("loop_a.png", c.image_dir / "loop_b.png")
    return c.image(c.link("loop_b.png", c.image_dir / "loop_a.png"))


def _directory(c: Corpus) -> int:
    (c.image_dir / "a_folder.png").mkdir()
    return c.image("a_folder.png")


ROW_KINDS: dict[str, Callable[[Corpus], Outcome]] = {
    # images that cannot be read
    "missing_file": lambda c: image_error(c.image("nowhere.png"), "missing_file"),
    "directory_as_file": lambda c: image_error(_directory(c), "missing_file"),
    "symlink_loop": lambda c: image_error(_symlink_loop(c), "missing_file"),
    "file_name_too_long": lambda c: image_error(c.image("a" * 5000 + ".png"), "missing_file"),
    "zero_byte_image": lambda c: image_error(c.image(c.file("empty.jpg", b"")), "unreadable_image"),
    "text_named_jpg": lambda c: image_error(c.image(c.file("text.jpg", b"not an image\n")), "unreadable_image"),
    "truncated_jpeg": lambda c: image_error(c.image(c.file("cut.jpg", _encoded(c.base, "JPEG")[:1500])),
                                            "unreadable_image"),
    "truncated_png": lambda c: image_error(c.image(c.file("cut.png", _encoded(c.base, "PNG")[:300])),
                                           "unreadable_image"),
    "decompression_bomb": lambda c: image_error(c.image(c.file("bomb.png", _png_header(30000, 30000)),
                                                        (30000, 30000)), "unreadable_image"),
    # file names that leave the image root, or are no path
    "path_traversal": lambda c: image_error(c.image("../outside.png"), "path_escapes_root"),
    "absolute_path": lambda c: image_error(c.image(str(c.root / "outside.png")), "path_escapes_root"),
    "symlink_out_of_root": lambda c: image_error(c.image(c.link("out.png", c.root / "outside.png")),
                                                 "path_escapes_root"),
    "file_name_null": lambda c: image_error(c.image(None), "bad_file_name"),
    "file_name_number": lambda c: image_error(c.image(17), "bad_file_name"),
    "file_name_empty": lambda c: image_error(c.image(""), "bad_file_name"),
    "file_name_nul_byte": lambda c: image_error(c.image("outside\0.png"), "bad_file_name"),
    "file_name_list": lambda c: image_error(c.image(["a.png"]), "bad_file_name"),
    # declared sizes that are not the file's, and ids that repeat
    "declared_size_differs": lambda c: image_error(c.image(c.file("small.png", c.base), (100, 128)), "size_mismatch"),
    "declared_size_swapped": lambda c: image_error(c.image(c.file("wide.png", c.base.resize((128, 96))), (96, 128)),
                                                   "size_mismatch"),
    "declared_size_strings": lambda c: image_error(c.image(c.file("str.png", c.base), ("128", "128")),
                                                   "size_mismatch"),
    "duplicate_image_id": _duplicate_image_id,
    # annotations that are rows of their own, their image audited with its good box
    "nan_coordinate": lambda c: box_error(c.host(bbox=[float("nan"), 10, 30, 30]), "non_finite_box"),
    "infinite_size": lambda c: box_error(c.host(bbox=[10, 10, float("inf"), 30]), "non_finite_box"),
    "integer_beyond_float": lambda c: box_error(c.host(bbox=[10, 10, 10 ** 400, 30]), "non_finite_box"),
    "bool_coordinate": lambda c: box_error(c.host(bbox=[True, 10, 30, 30]), "malformed_annotation"),
    "string_coordinate": lambda c: box_error(c.host(bbox=["10", 10, 30, 30]), "malformed_annotation"),
    "dict_bbox": lambda c: box_error(c.host(bbox={"x": 10, "y": 10, "w": 5, "h": 5}), "malformed_annotation"),
    "three_number_bbox": lambda c: box_error(c.host(bbox=[10, 10, 30]), "malformed_annotation"),
    "negative_size": lambda c: box_error(c.host(bbox=[40, 40, -10, 20]), "degenerate_box"),
    "zero_size": lambda c: box_error(c.host(bbox=[40, 40, 0, 0]), "degenerate_box"),
    "box_out_of_bounds": lambda c: box_error(c.host(bbox=[100, 100, 60, 60]), "box_out_of_bounds"),
    "unknown_category": lambda c: box_error(c.host(category_id=99), "unknown_category"),
    "list_category_id": lambda c: box_error(c.host(category_id=[1]), "malformed_annotation"),
    "string_category_id": lambda c: box_error(c.host(category_id="1"), "malformed_annotation"),
    "bool_category_id": lambda c: box_error(c.host(category_id=True), "malformed_annotation"),
    "float_category_id": lambda c: box_error(c.host(category_id=1.0), "malformed_annotation"),
    "duplicate_annotation_id": _duplicate_annotation_id,
    # annotations that name no image: rows of the run, stored once with its first shard
    "orphan_annotation": lambda c: Outcome(((ORPHAN_IMAGE_ID, c.annotation(ORPHAN_IMAGE_ID), "orphan_annotation"),)),
    "string_image_id_of_annotation": lambda c: Outcome(((None, c.annotation("1"), "malformed_annotation"),)),
    "list_image_id_of_annotation": lambda c: Outcome(((None, c.annotation([1]), "malformed_annotation"),)),
    "image_id_of_annotation_beyond_int64": lambda c: Outcome(((None, c.annotation(2 ** 63), "malformed_annotation"),)),
    # odd but valid pictures, audited
    "cmyk_jpeg": lambda c: audited(c.picture("cmyk.jpg", c.base.convert("CMYK"))),
    "grayscale_png": lambda c: audited(c.picture("gray.png", c.base.convert("L"))),
    "grayscale_jpeg": lambda c: audited(c.picture("gray.jpg", c.base.convert("L"))),
    "rgba_png": lambda c: audited(c.picture("rgba.png", c.base.convert("RGBA"))),
    "palette_png": lambda c: audited(c.picture("palette.png", c.base.convert("P"))),
    "one_bit_png": lambda c: audited(c.picture("bits.png", c.base.convert("1"))),
    "png_named_jpg": lambda c: audited(c.picture("really_png.jpg", c.base, format="PNG")),
    "tiny_1x1": lambda c: audited(c.picture("tiny.png", c.base.resize((1, 1)))),
    "odd_aspect_1x500": lambda c: audited(c.picture("thin.png", c.base.resize((1, 500)))),
    "exif_turned_declares_displayed_size": lambda c: audited(_exif_turned(c)),
    "png_16_bit_gray": lambda c: audited(_sixteen_bit(c, "L")),
    "png_16_bit_gray_alpha": lambda c: audited(_sixteen_bit(c, "LA")),
    "png_16_bit_rgb": lambda c: audited(_sixteen_bit(c, "RGB")),
    "png_16_bit_rgba": lambda c: audited(_sixteen_bit(c, "RGBA")),
    "gray_alpha_png": lambda c: audited(c.picture("la.png", c.base.convert("LA"))),
    "tiff_32_bit_integer": lambda c: audited(c.picture("int.tif", Image.fromarray(
        np.asarray(c.base.convert("L"), dtype=np.int32) * 257))),
    "tiff_float": lambda c: audited(c.picture("float.tif", Image.fromarray(
        np.asarray(c.base.convert("L"), dtype=np.float32) / 255))),
    "exif_turned_png": lambda c: audited(c.image(c.file("turned.png", c.base.resize((128, 96)),
                                                        exif=_orientation_6()), (96, 128))),
}


def _good(tmp: Path) -> tuple[dict, Path]:
    """The good part: four synthetic images (ids 1..4) the shipped model knows, and their image folder."""
    generate(tmp / "synth", n_train=0, n_val=N_GOOD, seed=3)
    return json.loads((tmp / "synth" / "annotations" / "val.json").read_text()), tmp / "synth" / "images" / "val"


def _audit_args(ann_file: Path, images: Path, out: Path) -> list[str | Path]:
    return ["--coco", ann_file, "--images", images, "--out", out, "--device", "cpu", "--batch-size", "1",
            "--shard-size", "8", "--max-detections", "3", "--no-findings", "--no-report"]


def _rows(store: Path, run_id: str, table: str, where: str = "TRUE") -> list[dict]:
    excluded = EXCLUDED.get(table)
    columns = f"* EXCLUDE ({', '.join(excluded)})" if excluded else "*"
    return query(store, f"SELECT {columns} FROM {table} WHERE run_id = ? AND {where} ORDER BY ALL",
                 [run_id]).to_pylist()


@dataclass(frozen=True)
class Audited:
    store: Path
    run_id: str
    args: list[str | Path]
    summary: dict
    outcomes: dict[str, Outcome]
    clean_store: Path
    clean_run_id: str


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    """The clean run of the good images, and the run of the good images with every row kind beside them."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    good, good_images = _good(tmp)
    corpus = Corpus(tmp / "corpus", Image.open(good_images / good["images"][0]["file_name"]).convert("RGB"))
    corpus.image_dir.mkdir(parents=True)
    corpus.base.save(corpus.root / "outside.png")
    for image in good["images"]:
        (corpus.image_dir / image["file_name"]).write_bytes((good_images / image["file_name"]).read_bytes())
    clean_file = tmp / "clean.json"  # the good images alone, in the same folder
    clean_file.write_text(json.dumps(good))
    clean = run_ok(*_audit_args(clean_file, corpus.image_dir, tmp / "clean_store"))

    outcomes = {name: build(corpus) for name, build in ROW_KINDS.items()}
    data = {**good, "images": good["images"] + corpus.images, "annotations": good["annotations"] + corpus.annotations}
    ann_file = corpus.root / "ann.json"
    ann_file.write_text(json.dumps(data))  # NaN and Infinity as json writes them, which json reads back
    args = _audit_args(ann_file, corpus.image_dir, tmp / "store")
    summary = run_ok(*args)
    return Audited(tmp / "store", summary["run_id"], args, summary, outcomes, tmp / "clean_store", clean["run_id"])


def test_the_corpus_has_a_kind_for_every_reason_a_source_gives(corpus_run: Audited) -> None:
    made = {row[2] for outcome in corpus_run.outcomes.values() for row in outcome.errors}
    assert len(ROW_KINDS) + len(FILE_KINDS) >= 30 and made == {reason.value for reason in ErrorReason}


@pytest.mark.parametrize("kind", list(ROW_KINDS))
def test_each_kind_leaves_its_rows_and_the_run_goes_on(corpus_run: Audited, kind: str) -> None:
    outcome = corpus_run.outcomes[kind]
    errors = Counter((r["image_id"], r["annotation_id"], r["type"])
                     for r in _rows(corpus_run.store, corpus_run.run_id, "errors"))
    for row, n in Counter(outcome.errors).items():
        assert errors[row] == n, f"{kind}: expected {n} x {row}, stored {errors[row]}"
    images = {r["image_id"]: r for r in _rows(corpus_run.store, corpus_run.run_id, "images")}
    for image_id, n_gt in outcome.audited.items():
        assert (images[image_id]["status"], images[image_id]["n_gt"]) == ("ok", n_gt), kind
    for image_id in outcome.failed:
        assert images[image_id]["status"] == "error", kind


def test_the_run_stores_exactly_the_kinds_rows_once_with_its_first_shard(corpus_run: Audited) -> None:
    stored = _rows(corpus_run.store, corpus_run.run_id, "errors")
    expected = Counter(row for outcome in corpus_run.outcomes.values() for row in outcome.errors)
    assert Counter((r["image_id"], r["annotation_id"], r["type"]) for r in stored) == expected
    assert {r["stage"] for r in stored} == {"source"}
    unattached = query(corpus_run.store, "SELECT DISTINCT shard FROM errors WHERE run_id = ? AND (image_id IS NULL "
                       f"OR image_id = {ORPHAN_IMAGE_ID})", [corpus_run.run_id]).column("shard").to_pylist()
    assert unattached == ["s00000"], "errors of no image go with the first shard, once"
    n_images = len({image_id for outcome in corpus_run.outcomes.values()
                    for image_id in (*outcome.audited, *outcome.failed)}) + N_GOOD
    assert corpus_run.summary["images"] == n_images


def test_good_images_are_audited_as_in_a_clean_run(corpus_run: Audited) -> None:
    good = f"image_id <= {N_GOOD}"
    for table in ("images", "instances"):
        clean = _rows(corpus_run.clean_store, corpus_run.clean_run_id, table)
        beside_bad = _rows(corpus_run.store, corpus_run.run_id, table, good)
        assert len(clean) > 0 and [r | {"run_id": None} for r in beside_bad] == [r | {"run_id": None} for r in clean]


def test_rerunning_the_corpus_skips_every_shard_and_adds_no_row(corpus_run: Audited) -> None:
    again = run_ok(*corpus_run.args)
    assert again["run_id"] == corpus_run.run_id and again["shards_skipped"] >= 1
    assert again["errors"] == corpus_run.summary["errors"] and again["images"] == corpus_run.summary["images"]


def test_a_run_over_the_max_error_rate_exits_1_and_keeps_what_it_wrote(corpus_run: Audited) -> None:
    images = corpus_run.summary["images"]
    share = (images - corpus_run.summary["audited"]) / images
    assert 0 < share < 1
    over = invoke("run", *corpus_run.args, "--max-error-rate", str(share / 2))
    assert over.code == 1 and over.stderr.count("error:") == 1, over.stderr
    assert f"{images - corpus_run.summary['audited']} of {images} images failed" in over.stderr
    assert f"more than --max-error-rate {share / 2:g}" in over.stderr
    assert json.loads(over.stdout.strip().splitlines()[-1])["run_id"] == corpus_run.run_id, "the summary still prints"
    assert f"auditing images: {images}/{images} done in" in over.stderr, "off a terminal, one line a step"
    assert run_ok(*corpus_run.args, "--max-error-rate", str(share))["run_id"] == corpus_run.run_id  # at the rate: 0


def _valid_file() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "circle"}]}


def _set(key: str, **change: Any) -> Callable[[dict], None]:
    """Change the first entry of `key` (images, annotations, categories)."""
    return lambda data: data[key][0].update(change)


# An annotation file that is no COCO dataset: (how to spoil a valid one, or the file's text; the message's gist).
FILE_KINDS: dict[str, tuple[Callable[[dict], None] | str, str]] = {
    "not_json": ("{oops", "not valid JSON"),
    "top_level_list": ("[1, 2]", "top level is list"),
    "missing_annotations": (lambda data: data.pop("annotations"), "missing list 'annotations'"),
    "image_entry_not_an_object": (lambda data: data["images"].append("a.png"), "every entry of 'images' needs"),
    "annotation_without_bbox": (lambda data: data["annotations"][0].pop("bbox"), "every entry of 'annotations'"),
    "string_image_id": (_set("images", id="000001"), "images[0] has id '000001'; ids must be integers within int64"),
    "image_id_beyond_int64": (_set("images", id=2 ** 63), f"images[0] has id {2 ** 63}"),
    "float_image_id": (_set("images", id=1.5), "images[0] has id 1.5"),
    "bool_image_id": (_set("images", id=True), "images[0] has id True"),
    "null_image_id": (_set("images", id=None), "images[0] has id None"),
    "string_annotation_id": (_set("annotations", id="1"), "annotations[0] has id '1'"),
    "list_category_id_of_category": (_set("categories", id=[1]), "categories[0] has id [1]"),
    "null_category_name": (_set("categories", name=None), "categories[0] has name None, not a string"),
    "repeated_category_id": (lambda data: data["categories"].append({"id": 1, "name": "again"}),
                             "category id(s) [1] appear more than once"),
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_a_file_that_is_no_coco_dataset_exits_2_with_one_line(tmp_path: Path, kind: str) -> None:
    spoil, gist = FILE_KINDS[kind]
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    ann_file = tmp_path / "ann.json"
    if isinstance(spoil, str):
        ann_file.write_text(spoil)
    else:
        data = _valid_file()
        spoil(data)
        ann_file.write_text(json.dumps(data))
    # CliRunner as tests/cli.py's `invoke`, but stderr as printed: the claim is about its lines.
    result = CliRunner().invoke(app, ["run", *map(str, _audit_args(ann_file, tmp_path / "images", tmp_path / "store"))])
    assert result.exit_code == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and gist in lines[0] and str(ann_file) in lines[0]
    assert not (tmp_path / "store").exists(), "refused before anything is written"
