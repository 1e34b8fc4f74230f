"""The audit's HTML report: one self-contained file a reviewer can mail, archive or open offline.

Everything is inline (CSS, figures as base64 PNG data URIs) and the page carries a Content-Security-Policy
that forbids loading anything else and running scripts, so an image or a link smuggled into the data
cannot make the page reach out. Every value read from the store is escaped. All data comes through
`storage.catalog.query`, read-only.

A classification run (`runs.task` classify) is reported in a classifier's words: its instances are predictions,
correct or wrong, and the true class of a wrong one (missed), each explained on the whole image, so the cards draw
the object box of the image's class (when the index gives one) and no box for the prediction.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eive_audit.pipeline.config import OUTCOME_ROLES, sql_outcome_in
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.sources.decode import decode_rgb, fit_size
from eive_audit.reports.diff import MATCH_IOU, diff_command, support_change
from eive_audit.reports.overlay import map_to_image, peak_in_crop
from eive_audit.reports.plots import (HEAT_SCALING, PANEL_PIXELS, Panel, colour_bar, mark_peak, overlay,
                                      score_distribution)
from eive_audit.reports.views import (FP_BACKGROUND, LOWEST_INSERTION_AUC, MISSED, TP_OFF_OBJECT, cue_view,
                                      explainer_view, open_command, view_name)
from eive_audit.storage.catalog import query

# Scores plotted per class, in METHODS.md section 4 order; peak_in_gt is a yes/no and reads better in captions.
PLOTTED_SCORES = ("mass_in_gt", "mass_in_pred", "mass_on_other_gt", "compactness", "deletion_auc", "insertion_auc")
CAPTION_SCORES = ("mass_in_gt", "mass_in_pred", "mass_on_other_gt", "peak_in_gt", "compactness", "deletion_auc",
                  "insertion_auc")
MAX_ERROR_ROWS = 300
TOP_SPURIOUS = 15  # rows of the "most spurious instances" table, each with a card
# The dataset the push commands suggest for a run that has none (`review.fiftyone_dataset` unset).
SUGGESTED_DATASET = "eive-audit"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1240px; padding: 0 16px 40px; color: #222; }
h1 { font-size: 22px; margin: 18px 0 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; margin-top: 28px; }
nav a { margin-right: 14px; } .note { color: #555; }
header.top { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #ddd; padding: 4px 0;
             display: flex; flex-wrap: wrap; align-items: center; gap: 6px 18px; }
.key { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #444; max-width: 760px; }
[id] { scroll-margin-top: 96px; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; font-size: 12px; word-break: break-all; }
.review { margin: 10px 0; padding: 6px 10px; border-left: 4px solid #1565c0; background: #f3f7fc; font-size: 13px; }
.review ul { margin: 2px 0; padding-left: 20px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f4f4; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
img.plot { max-width: 100%; border: 1px solid #eee; }
figure.failure { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; background: #fafafa;
                 display: flex; gap: 10px; align-items: flex-start; }
figure.failure.stacked { flex-direction: column; } figure.failure:target { outline: 3px solid #ff9800; }
figure.failure img { display: block; } figcaption { font-size: 12px; max-width: 280px; }
.finding { margin: 10px 0; padding: 8px 10px; border-radius: 6px; }
.finding.confirmed { border: 2px solid #2e7d32; background: #f1f8f1; }
.finding.unconfirmed { border: 2px dashed #9e9e9e; background: #fafafa; color: #555; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.confirmed { background: #2e7d32; } .badge.unconfirmed { background: #9e9e9e; }
figure.cue { display: flex; flex-wrap: wrap; gap: 8px; margin: 0; }
figure.exemplar { margin: 0; } img.crop { display: block; width: 128px; image-rendering: pixelated; }
figcaption table { font-size: 11px; } h3 { font-size: 15px; margin: 18px 0 6px; }
#errors td { font-size: 12px; word-break: break-word; }
"""


@dataclass(frozen=True)
class _Rule:
    """One kind of failure for the gallery: which instances, in which order, how the page says so, and the
    saved FiftyOne view (reports.views) that holds more of its kind."""

    title: str
    where: str  # SQL condition over `instances` (constant text, never user input)
    order: str
    chosen: str
    view: str
    view_holds: str


_MISSES = _Rule("Missed objects", sql_outcome_in("fn"), "mass_in_gt ASC NULLS LAST",
                "missed GT boxes (fn), each explained through the query whose box overlaps it most, "
                "least mass_in_gt first (the query looked elsewhere)", MISSED, "every missed object of the run")
_FALSE_POSITIVES = _Rule("False positives", sql_outcome_in("fp", "dup"), "score DESC",
                         "false positives and duplicates, most confident first", FP_BACKGROUND,
                         "the false positives flagged as driven by background")
_CORRECT = _Rule("Correct, but looking elsewhere", f"{sql_outcome_in('tp')} AND mass_in_gt IS NOT NULL", "mass_in_gt ASC",
                 "correct detections (tp) with the least mass_in_gt", TP_OFF_OBJECT,
                 "the correct detections flagged off their object")


@dataclass(frozen=True)
class _Words:
    """How the page names a task's instances: a detector's detections and misses, or a classifier's predictions
    and the true classes of its wrong ones. The gallery's rules are the same SQL in either words."""

    task: str
    rules: tuple[_Rule, _Rule, _Rule]  # misses, wrong ones, correct ones looking elsewhere: the gallery's order
    thing: str  # what one instance is
    model: str
    score: str  # what a re-scored instance's score is
    tp: str  # what flag_off_object and flag_background_fp mark
    fp: str


_WORDS = {
    "detect": _Words("detect", (_MISSES, _FALSE_POSITIVES, _CORRECT), "detection", "detector", "score",
                     "correct detections", "false positives"),
    "classify": _Words("classify", (
        _Rule("The true class of wrong predictions", sql_outcome_in("fn"), "mass_in_gt ASC NULLS LAST",
              "the true class of each wrong prediction (missed), explained on the whole image, least mass_in_gt "
              "first (where the model looked for the class it should have said)", MISSED,
              "the true class of every wrong prediction of the run"),
        _Rule("Wrong predictions", sql_outcome_in("fp", "dup"), "score DESC", "wrong predictions, most confident "
              "first", FP_BACKGROUND, "the wrong predictions flagged as driven by background"),
        _Rule("Correct predictions, but looking elsewhere", f"{sql_outcome_in('tp')} AND mass_in_gt IS NOT NULL",
              "mass_in_gt ASC", "correct predictions with the least mass_in_gt (the map's share on the object box of "
              "their class)", TP_OFF_OBJECT, "the correct predictions flagged off their object")),
        "prediction", "classifier", "class probability", "correct predictions", "wrong predictions"),
}


def write_report(store: Path, run_id: str, out: Path, top_failures: int = 24,
                 extra_sections: Sequence[tuple[str, str]] = (), diff: dict[str, Any] | None = None) -> Path:
    """Write the HTML report of one run of the store to `out` (atomically) and return its path.

    top_failures: cards in the failure gallery: up to a third misses, up to a third false positives,
    the rest correct detections with the least mass on their object.
    extra_sections: (title, HTML) pairs appended as sections; the HTML must already be safe (escaped).
    diff: the run's `reports.diff.run_diff` against an earlier run, shown after the run's summary.
    """
    if top_failures < 0:
        raise ValueError(f"top_failures must be >= 0, got {top_failures}")
    store = Path(store)
    runs = query(store, "SELECT * FROM runs WHERE run_id = ?", [run_id]).to_pylist()
    if not runs:
        raise ValueError(f"no run {run_id!r} in the store at {store}")
    run = runs[0]
    config = json.loads(run["config_json"])
    words = _WORDS[run.get("task") or "detect"]
    explainers = run["explainers"].split(",")
    review = _Review(store, run_id, (config.get("review") or {}).get("fiftyone_dataset"))
    every_map = [(explainer_view(run_id, e), f"every map of explainer {e}", False) for e in explainers]
    chosen = _chosen_ids(store, run_id, explainers[0], top_failures, words.rules)
    spurious = _most_spurious(store, run_id)
    in_gallery = [instance_id for _, _, group in chosen for instance_id in group]
    cards = _cards(store, run_id, explainers, Path(config["images"]),
                   [*in_gallery, *(r["instance_id"] for r in spurious if r["instance_id"] not in in_gallery)])
    sections = [
        ("summary", "Run", _summary(store, run) + review.block(every_map)),
        *([("changes", f"Changes since run {diff['base']}", _changes(store, diff, words))] if diff else []),
        ("findings", "Findings: candidate cues", _flags(store, run_id, config["findings"], words)
         + _findings(store, run_id, config["findings"], spurious, cards, set(in_gallery), review, words)),
        ("failures", "Failure gallery", _failures(chosen, cards, explainers[0], top_failures, review, words)),
        ("plots", "Score distributions", _plots(store, run_id) + review.block(
            [(view_name(run_id, LOWEST_INSERTION_AUC), "instances with an insertion AUC, lowest first", True)])),
        ("config", "Configuration", _table(["key", "value"], _config_rows(config)) + review.block(every_map)),
        ("errors", "Errors", _errors(store, run_id) + review.block(
            every_map, "Images that failed have no sample in FiftyOne; the run's audited ones:")),
        *((f"extra-{_slug(title)}", title, body) for title, body in extra_sections),
    ]
    page = _page(f"eive-audit report: run {run_id}", sections)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")  # opened normally, so the umask sets its mode
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def _page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document; section bodies are already-safe HTML, ids and titles are escaped here. The
    navigation and the maps' colour bar stay at the top of the window (CSS only), so every card on the page
    is read against the one key."""
    nav = " ".join(f'<a href="#{html.escape(id_)}">{html.escape(name)}</a>' for id_, name, _ in sections)
    key = (f'<div class="key">{_img(colour_bar(), "colour bar of the saliency maps", "colourbar")}'
           f'<span class="scaling">Map colours: {html.escape(HEAT_SCALING)}.</span></div>')
    body = "\n".join(f'<section id="{html.escape(id_)}" class="{"extra" if id_.startswith("extra-") else "core"}">'
                     f"<h2>{html.escape(name)}</h2>\n{content}\n</section>" for id_, name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
            f'<body><h1>{html.escape(title)}</h1><header class="top"><nav>{nav}</nav>{key}</header>\n'
            f"{body}\n</body></html>\n")


class _Html(str):
    """Markup built here from escaped parts (a link, a badge), put into a table cell as it is."""


@dataclass(frozen=True)
class _Review:
    """Where a section's instances are in the FiftyOne App: the run's dataset (its `review.fiftyone_dataset`,
    None when the run was not pushed) and the commands that push the run and open a saved view, so a
    reviewer can go from any part of the page to the same instances in the App."""

    store: Path
    run_id: str
    dataset: str | None

    def block(self, views: Sequence[tuple[str, str, bool]], lead: str = "") -> str:
        """The section's saved views, each (name, what it holds, also saved on the image dataset), with the
        command that opens it on the instance dataset (and on the image dataset); the push command first
        when the run has no dataset yet. `lead`: a sentence before the list."""
        dataset = self.dataset or SUGGESTED_DATASET
        push = "" if self.dataset else (
            "<br>This run is not in FiftyOne yet; push it first: "
            + _code(f"eive-audit push --store {shlex.quote(str(self.store))} --run {shlex.quote(self.run_id)} "
                    f"--dataset {shlex.quote(dataset)}"))
        items = "".join(f"<li>{self.line(*view)}</li>" for view in views)
        return (f'<div class="review"><b>In FiftyOne</b> (dataset {_code(dataset)}, one sample per image; '
                f"{_code(dataset + '-instances')}, one per instance and explainer){push}"
                f"{'<br>' + html.escape(lead) if lead else ''}<ul>{items}</ul></div>")

    def line(self, view: str, what: str, on_images: bool) -> str:
        """One saved view: what it holds, its name and the command opening it (on both datasets when it is
        saved on both)."""
        dataset = self.dataset or SUGGESTED_DATASET
        images = f" (images: {_code(open_command(dataset, view))})" if on_images else ""
        return (f"{html.escape(what)}: view {_code(view)}: {_code(open_command(f'{dataset}-instances', view))}"
                f"{images}")


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _card_id(instance_id: str) -> str:
    """The HTML id of an instance's card: readable, without the characters an id or a URL fragment cannot
    hold plainly (then made unique again with a digest of the id)."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", instance_id)
    digest = "" if safe == instance_id else "-" + hashlib.sha1(instance_id.encode()).hexdigest()[:8]
    return f"card-{safe}{digest}"


def _format(value: Any) -> str:
    """A cell's text: floats to 3 decimals, missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table of plain values, every cell escaped; numbers right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, _Html):
        return f"<td>{value}</td>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_format(value)}</td>'
    return f"<td>{html.escape(_format(value))}</td>"


def _img(png: bytes, alt: str, css_class: str) -> str:
    return (f'<img class="{css_class}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def _config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in config.items()]


def _summary(store: Path, run: dict[str, Any]) -> str:
    """Run facts, counts (images by status, instances by explainer and outcome, errors) and timings."""
    run_id = run["run_id"]
    facts = _table(["run", "status", "model", "explainers", "created", "finished", "seconds"],
                   [(run_id, run["status"], run["model"], run["explainers"], str(run["created_at"]),
                     str(run["finished_at"] or "–"), run["seconds"])])
    images = query(store, "SELECT status, count(*) AS n FROM images WHERE run_id = ? GROUP BY status ORDER BY status",
                   [run_id]).to_pylist()
    n_errors = query(store, "SELECT count(*) AS n FROM errors WHERE run_id = ?", [run_id]).column("n")[0].as_py()
    by_status = _table(["images", *(row["status"] for row in images), "errors rows"],
                       [("count", *(row["n"] for row in images), n_errors)])
    instances = query(store, "SELECT explainer, outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY ALL",
                      [run_id]).to_pylist()
    present = {row["outcome"] for row in instances}
    outcomes = [o for o in OUTCOME_ROLES if o in present] + sorted(present - set(OUTCOME_ROLES))  # right, wrong, missed
    counts = {(row["explainer"], row["outcome"]): row["n"] for row in instances}
    by_outcome = _table(["explainer", *outcomes, "all"],
                        [(e, *(counts.get((e, o), 0) for o in outcomes), sum(counts.get((e, o), 0) for o in outcomes))
                         for e in sorted({row["explainer"] for row in instances})])
    if run.get("task") == "classify":
        by_outcome += ('<p class="note">correct: the predicted class is the true one; wrong: it is not; missed: '
                       "the true class of a wrong prediction, explained too; det: an image without a true class."
                       "</p>")
    timing = query(store, """
        SELECT median(forward_ms) AS f50, quantile_cont(forward_ms, 0.95) AS f95,
               median(explain_ms) AS e50, quantile_cont(explain_ms, 0.95) AS e95
        FROM images WHERE run_id = ? AND forward_ms IS NOT NULL""", [run_id]).to_pylist()[0]
    timings = _table(["per image (ms)", "median", "p95"],
                     [("forward", timing["f50"], timing["f95"]), ("explain", timing["e50"], timing["e95"])])
    return (f"{facts}<div class=\"grid\"><div><h3>Images</h3>{by_status}</div>"
            f"<div><h3>Instances by outcome</h3>{by_outcome}</div><div><h3>Timings</h3>{timings}</div></div>")


def _flags(store: Path, run_id: str, findings: dict[str, Any], words: _Words = _WORDS["detect"]) -> str:
    """How many instances each off-object flag marks, per explainer: the flag columns the audit wrote with
    every shard (at the run's `findings` thresholds), the very ones the FiftyOne views filter on."""
    rows = query(store, "SELECT explainer, count(*) FILTER (flag_off_object) AS off_object, "
                        "count(*) FILTER (flag_background_fp) AS background_fp, "
                        "count(*) FILTER (flag_miss_elsewhere) AS miss_elsewhere, count(*) AS n "
                        "FROM instances WHERE run_id = ? GROUP BY explainer ORDER BY explainer", [run_id]).to_pylist()
    reach = ("the cells its box touches" if findings["reach_cells"] == 0
             else f"{findings['reach_cells']} cell(s) around the cells its box touches")
    lead = (f"<p>Flags read the normalised off-object share (off_object_norm): the share of a map beyond {reach} "
            "at the attention grid, so a map on a small or thin object's cells is not off it (the raw share off "
            "the box, off_object_share, is kept beside it). ")
    if words.task == "classify":
        rule = (f"{lead}The box is the object box of the image's class, where the index gives boxes (without "
                "them an instance's object is the whole image: nothing is off it, nothing flagged). A correct "
                f"prediction is flagged from {_format(findings['off_object'])} off "
                f"its object (flag_off_object), a wrong prediction from {_format(findings['background'])} off every "
                f"object box of the image (flag_background_fp), the true class of a wrong prediction when its map "
                f"put {_format(findings['off_object'])} off the object (flag_miss_elsewhere).</p>")
    else:
        rule = (f"{lead}A correct detection or duplicate is flagged from "
                f"{_format(findings['off_object'])} (flag_off_object), a false positive from "
                f"{_format(findings['background'])} off every GT object (flag_background_fp), a miss whose query put "
                f"{_format(findings['off_object'])} off the missed object (flag_miss_elsewhere).</p>")
    return rule + _table(["explainer", "flag_off_object", "flag_background_fp", "flag_miss_elsewhere", "instances"],
                         [tuple(row.values()) for row in rows])


def _most_spurious(store: Path, run_id: str) -> list[dict[str, Any]]:
    """The TOP_SPURIOUS (instance, explainer) rows with the highest spurious score: the findings' table."""
    return query(store, "SELECT instance_id, explainer, outcome, label_name, score, off_object_norm, "
                        "off_object_share, verification_drop, spurious_score, cue_id, flag_reason FROM instances "
                        "WHERE run_id = ? AND spurious_score IS NOT NULL ORDER BY spurious_score DESC, instance_id "
                        "LIMIT ?", [run_id, TOP_SPURIOUS]).to_pylist()


def _findings(store: Path, run_id: str, findings: dict[str, Any], spurious: list[dict[str, Any]],
              cards: dict[str, str], in_gallery: set[str], review: _Review, words: _Words = _WORDS["detect"]) -> str:
    """One row per candidate cue (a cluster of flagged instances of one class whose off-object peaks look
    alike), confirmed ones first, then each cue with its verification in words and its marked exemplar crops;
    then the most spurious instances, each row linked to its card (in the gallery, or below the table)."""
    views = review.block([(view_name(run_id, TP_OFF_OBJECT), f"{words.tp} flagged off their object", True),
                          (view_name(run_id, FP_BACKGROUND), f"{words.fp} flagged as driven by background", True)])
    if not spurious:
        return f"<p>No findings for this run (the findings step was off).</p>{views}"
    cues = query(store, "SELECT * FROM findings WHERE run_id = ? ORDER BY confirmed DESC, support DESC, cue_id",
                 [run_id]).to_pylist()
    budget = query(store, "SELECT count(*) AS n, count(verification_drop) AS verified, count(specificity) AS localised, "
                          "count(*) FILTER (verification_drop >= ?) AS confirmed FROM instances WHERE run_id = ?",
                   [findings["confirm_drop"], run_id]).to_pylist()[0]
    rescored = "every detection re-scored" if words.task == "detect" else "every instance's class probability re-scored"
    intro = ("<p>Within the forward budget, each image has the surroundings of all its objects blurred at once "
             f"(the objects kept) and {rescored}, the images of the most suspicious instances first "
             "(by their margin over the score threshold, normalised off-object share and outcome); the largest "
             "drops are then localised, tile by tile and window by window, and the window whose blur hurts most "
             f"becomes the peak. Each peak is described by the {words.model}'s feature "
             "there, its position relative to the box and its colour; peaks of one class that cluster are a "
             "candidate cue. The spurious score is the "
             f"probability that the {words.thing} relies on something besides its object, from all of that.</p>"
             f"<p><b>Verification drop</b>: how much the {words.thing}'s {words.score} falls, relative to its "
             "score, when the image around the objects (where the off-object peak lies) is blurred: 0.5 means it halved. A "
             f"cue is <b>confirmed</b> when its members' mean drop is {_format(findings['confirm_drop'])} or more: "
             f"the {words.model} needs that region. A small drop says it hardly does; a <b>negative</b> drop means "
             "blurring <i>raised</i> the score: the region is not the evidence (if anything it distracted the "
             f"{words.model}).</p>"
             f"<p>Forward budget: {budget['verified']} of {budget['n']} instances verified "
             f"({budget['n'] - budget['verified']} skipped), {budget['localised']} of {budget['confirmed']} "
             "confirmed ones localised.</p>")
    cue_rows = [(_Html(f'<a href="#{html.escape(_cue_id(c["cue_id"]))}">{html.escape(c["cue_id"])}</a>'), c["label_name"],
                 f'{c["support"]} of {c["flagged_in_class"]}', c["mean_spurious_score"],
                 f'({c["offset_x"]:+.2f}, {c["offset_y"]:+.2f})', c["verification_drop"], _badge(c["confirmed"]))
                for c in cues]
    table = _table(["cue", "class", "support (of described)", "mean spurious score", "peak offset (box w, h)",
                    "verification drop", "confirmed"], cue_rows) if cues else "<p>No candidate cue: no cluster of described peaks.</p>"
    peaks = _exemplar_peaks(store, run_id) if cues else {}
    blocks = "".join(_cue(c, peaks, cards, findings["confirm_drop"], review, words.model) for c in cues)
    top = _table(["instance (card)", "explainer", "outcome", "class", "score", "off-object (normalised)",
                  "off-object (raw)", "verification drop", "spurious score", "cue", "why flagged"],
                 [(_link(r["instance_id"], cards), *list(r.values())[1:]) for r in spurious])
    extra = "".join(cards[i] for i in dict.fromkeys(r["instance_id"] for r in spurious)
                    if i not in in_gallery and i in cards)
    where = ("Each instance links to its card: in the failure gallery when it is there, else below, where the "
             "explainer's peak is ringed as in the gallery.")
    return (f"{intro}{table}{blocks}<h3>Most spurious instances</h3><p class=\"note\">{where}</p>{top}"
            f'<div class="grid">{extra}</div>{views}')


def _cue_id(cue_id: str) -> str:
    """The HTML id of a cue's block (see `_card_id`)."""
    return "cue-" + _card_id(cue_id).removeprefix("card-")


def _badge(confirmed: bool) -> _Html:
    kind = "confirmed" if confirmed else "unconfirmed"
    return _Html(f'<span class="badge {kind}">{kind}</span>')


def _link(instance_id: str, cards: dict[str, str]) -> _Html:
    """An instance id, as a link to its card when the page has one."""
    text = html.escape(instance_id)
    return _Html(f'<a href="#{html.escape(_card_id(instance_id))}">{text}</a>' if instance_id in cards else text)


def _drop_in_words(drop: float | None, confirm_drop: float, model: str = "detector") -> str:
    """What a cue's mean verification drop says, as a reviewer would put it."""
    if drop is None:
        return "not verified: none of its members' images fit the forward budget, so nothing tested the region"
    if drop < 0:
        return (f"verification drop {drop:.2f}: blurring raised its members' scores by {-drop:.0%} on average, "
                "so the region is not the evidence")
    verdict = (f"the {model} needs the region" if drop >= confirm_drop
               else f"below the {confirm_drop:.2f} that confirms a cue: the {model} hardly needs the region")
    return f"verification drop {drop:.2f}: blurring cut its members' scores by {drop:.0%} on average; {verdict}"


def _exemplar_peaks(store: Path, run_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The peak and geometry of every cue member, by (instance_id, explainer): where its crop's mark goes."""
    rows = query(store, """
        SELECT i.instance_id, i.explainer, i.peak_x, i.peak_y, g.width, g.height, g.input_height, g.input_width,
               g.padded_height, g.padded_width, m.grid_h, m.grid_w
        FROM instances i
        JOIN images g ON g.run_id = i.run_id AND g.image_id = i.image_id
        JOIN maps m ON m.run_id = i.run_id AND m.instance_id = i.instance_id AND m.explainer = i.explainer
        WHERE i.run_id = ? AND i.cue_id IS NOT NULL AND i.peak_x IS NOT NULL""", [run_id]).to_pylist()
    return {(r["instance_id"], r["explainer"]): r for r in rows}


def _cue(cue: dict[str, Any], peaks: dict[tuple[str, str], dict[str, Any]], cards: dict[str, str],
         confirm_drop: float, review: _Review, model: str = "detector") -> str:
    """A cue's block, styled as confirmed or not: badge and verification in words, its exemplar crops with the
    peak marked and each captioned with its instance id (linked to its card when there is one), its FiftyOne
    view."""
    kind = "confirmed" if cue["confirmed"] else "unconfirmed"
    crops = "".join(_crop(png, instance_id, peaks.get((instance_id, cue["explainer"])), cards)
                    for png, instance_id in zip(cue["exemplar_crops"], cue["exemplar_ids"]))
    head = (f"{_badge(cue['confirmed'])} <b>{html.escape(cue['cue_id'])}</b> · {html.escape(cue['label_name'])} · "
            f"{cue['support']} of {cue['flagged_in_class']} described peaks · "
            f"{html.escape(_drop_in_words(cue['verification_drop'], confirm_drop, model))}")
    view = review.line(cue_view(review.run_id, cue["cue_id"]), "its members", True)
    return (f'<div class="finding {kind}" id="{html.escape(_cue_id(cue["cue_id"]))}"><p>{head}</p>'
            f'<figure class="cue">{crops}</figure><p class="note">In FiftyOne, {view}</p></div>')


def _crop(png: bytes, instance_id: str, peak: dict[str, Any] | None, cards: dict[str, str]) -> str:
    """One exemplar crop with its peak marked (when the store has the peak) and its instance id beneath."""
    marked = "crop without a stored peak: not marked"
    if peak is not None:
        with Image.open(io.BytesIO(png)) as picture:
            size = picture.size
        at = peak_in_crop(size, Geometry.from_image_row(peak, (peak["grid_h"], peak["grid_w"])),
                          (peak["peak_x"], peak["peak_y"]))
        png, marked = mark_peak(png, at), "peak ringed"
    return (f'<figure class="exemplar" data-instance="{html.escape(instance_id)}">'
            f"{_img(png, f'peak crop of {instance_id}', 'crop')}"
            f'<figcaption>{_link(instance_id, cards)}<br><span class="note">{marked}</span></figcaption></figure>')


def _changes(store: Path, diff: dict[str, Any], words: _Words = _WORDS["detect"]) -> str:
    """What changed since the diff's base run (reports.diff): its summary, the cues that appeared, grew,
    shrank or vanished, the instances newly and no longer flagged, and the per-class measures."""
    parts = [f'<p class="note">Against the previous run of this dataset, <b>{html.escape(diff["base"])}</b>. '
             f"Instances match by image file, explainer, class{_matched_boxes(words)}, cues "
             f"by class, peak offset and colour. All of it as JSON: {_code(diff_command(store, diff))}</p>",
             _table(["measure", "value"], list(diff["summary"].items()))]
    for title, key in (("Cues that appeared", "appeared"), ("Cues that grew", "grew"), ("Cues that shrank", "shrank"),
                       ("Cues that vanished", "vanished")):
        rows = [(c["cue_id"], c["label_name"], support_change(c), c["confirmed"], c["verification_drop"])
                for c in diff["cues"][key]]
        parts.append(f"<h3>{title} ({len(rows)})</h3>"
                     + (_table(["cue", "class", "support", "confirmed", "verification drop"], rows) if rows else ""))
    for title, key in (("Newly flagged", "newly_flagged"), ("No longer flagged", "no_longer_flagged")):
        rows = [list(row.values()) for row in diff[key]]
        parts.append(f"<h3>{title} ({diff['summary'][key]})</h3>" + (_table(
            ["instance", "in the other run", "image", "explainer", "class", "outcome", "why flagged"], rows)
            if rows else ""))
    measures = ("mass_in_gt", "insertion_auc", "precision", "recall")
    parts.append("<h3>Per class</h3>" + _table(
        ["explainer", "class", *(f"{m} (base → run)" for m in measures)],
        [(c["explainer"], c["label_name"], *(f"{_format(c[m]['base'])} → {_format(c[m]['run'])}" for m in measures))
         for c in diff["classes"]]))
    return "".join(parts)


def _matched_boxes(words: _Words) -> str:
    """How the diff matches boxes, in the page's words (a classifier's instances all have the whole image)."""
    return (f" and overlapping boxes (IoU &ge; {MATCH_IOU})" if words.task == "detect"
            else " (a classifier's boxes are all the whole image)")


def _plots(store: Path, run_id: str) -> str:
    """One figure per score (per class, per outcome, per explainer); a note for a score that is all null."""
    rows = query(store, f"SELECT explainer, label_name, outcome, {', '.join(PLOTTED_SCORES)} FROM instances "
                        "WHERE run_id = ?", [run_id])
    if rows.num_rows == 0:
        return '<p class="note">This run has no explained instances.</p>'
    figures, missing = [], []
    for score in PLOTTED_SCORES:
        png = score_distribution(rows.select(["explainer", "label_name", "outcome", score]), score)
        if png is None:
            missing.append(score)
        else:
            figures.append(_img(png, f"{score} by class and outcome", "plot"))
    note = (f'<p class="note">Not plotted, no values in this run: {html.escape(", ".join(missing))} '
            "(faithfulness AUCs exist only within the run's --faithfulness budget).</p>" if missing else "")
    legend = '<p class="note">Boxes: quartiles and median, whiskers to 1.5 IQR; dots: every instance.</p>'
    return f'{legend}<div class="plots">{"".join(figures)}</div>{note}'


def _chosen_ids(store: Path, run_id: str, explainer: str, top: int,
                rules: tuple[_Rule, _Rule, _Rule] = (_MISSES, _FALSE_POSITIVES, _CORRECT)
                ) -> list[tuple[_Rule, int, list[str]]]:
    """(rule, slots, instance ids) per rule of `rules` (misses, wrong ones, correct ones), ranked by the run's
    first explainer: misses and wrong ones get a third of `top` each, correct ones every slot the others leave."""
    chosen = []
    left = top
    misses, wrong, correct = rules
    for rule, quota in ((misses, top // 3), (wrong, top // 3), (correct, top)):
        slots = min(quota, left)
        ids = query(store, f"SELECT instance_id FROM instances WHERE run_id = ? AND explainer = ? AND {rule.where} "
                           f"ORDER BY {rule.order}, instance_id LIMIT ?", [run_id, explainer, slots]
                    ).column("instance_id").to_pylist()
        chosen.append((rule, slots, ids))
        left -= len(ids)
    return chosen


def _cards(store: Path, run_id: str, explainers: list[str], image_root: Path, ids: list[str]) -> dict[str, str]:
    """The card of each instance in `ids` that has maps, by instance id (each drawn once, wherever it shows)."""
    rows = query(store, """
        SELECT i.*, g.file_path, g.width, g.height, g.input_height, g.input_width, g.padded_height, g.padded_width,
               m.grid_h, m.grid_w, m."map"
        FROM instances i
        JOIN images g ON g.run_id = i.run_id AND g.image_id = i.image_id
        JOIN maps m ON m.run_id = i.run_id AND m.instance_id = i.instance_id AND m.explainer = i.explainer
        WHERE i.run_id = ? AND list_contains(?, i.instance_id)""", [run_id, ids]).to_pylist()
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: explainers.index(r["explainer"])):  # panels in the run's explainer order
        by_instance.setdefault(row["instance_id"], []).append(row)
    classes = _image_classes(store, run_id, sorted({row["image_id"] for row in rows if row.get("task") == "classify"}))
    return {i: _card(by_instance[i], image_root, classes.get(by_instance[i][0]["image_id"]))
            for i in ids if i in by_instance}


def _image_classes(store: Path, run_id: str, image_ids: list[int]) -> dict[int, dict[str, str]]:
    """Classified images' predicted and true classes, by image id ("predicted", "true": each where the image
    has it): what a card of either instance of a wrong prediction names beside its own class."""
    if not image_ids:
        return {}
    rows = query(store, "SELECT DISTINCT image_id, outcome, label_name FROM instances WHERE run_id = ? AND "
                        "list_contains(?, image_id)", [run_id, image_ids]).to_pylist()
    classes: dict[int, dict[str, str]] = {}
    for row in rows:
        role = OUTCOME_ROLES[row["outcome"]]
        found = classes.setdefault(row["image_id"], {})
        if role in ("tp", "fn"):
            found["true"] = row["label_name"]
        if role != "fn":
            found["predicted"] = row["label_name"]
    return classes


def _failures(chosen: list[tuple[_Rule, int, list[str]]], cards: dict[str, str], ranked_by: str, top: int,
              review: _Review, words: _Words = _WORDS["detect"]) -> str:
    """The gallery: how cards were chosen, then one card per instance with every explainer's map, each kind
    with the FiftyOne view holding its like."""
    how = "".join(f"<li>up to {slots}: {html.escape(rule.chosen)}</li>" for rule, slots, _ in chosen)
    intro = (f'<p class="note">{top} cards at most, ranked by the scores of explainer '
             f"<b>{html.escape(ranked_by)}</b>:</p><ul>{how}</ul>"
             '<p class="note">Each card shows the image as audited, then every explainer\'s map over it (colours as '
             f"in the colour bar at the top of the page), with {_boxes_drawn(words)} and, where the findings "
             "described one, the explainer's peak (red ring: its map's strongest "
             "window off the object, or the window whose blur hurt the score most once localised).</p>")
    parts = [intro]
    for rule, _, group in chosen:
        shown = [cards[i] for i in group if i in cards]
        body = "".join(shown) if shown else '<p class="note">None in this run.</p>'
        parts.append(f"<h3>{html.escape(rule.title)} ({len(shown)})</h3><div class=\"grid\">{body}</div>"
                     + review.block([(view_name(review.run_id, rule.view), rule.view_holds, True)]))
    return "".join(parts)


def _boxes_drawn(words: _Words) -> str:
    """What boxes a card draws, in the page's words."""
    if words.task == "classify":
        return ("the object box of the image's class where the index gives one (dashed green; a prediction's box "
                "is the whole image, so none is drawn for it)")
    return "the explained query's box (solid cyan), the GT box (dashed green)"


def _read_image(file_path: str | None, root: Path) -> np.ndarray | None:
    """The source image as displayed, uint8 RGB at most PANEL_PIXELS a side (what a card shows; a 12000 x 9000
    photo is never decoded whole), or None if it is gone, unreadable, or outside the run's image root."""
    if not file_path:
        return None
    path = Path(file_path).resolve()
    if not path.is_relative_to(root.resolve()):
        return None
    try:
        return decode_rgb(path, PANEL_PIXELS).permute(1, 2, 0).numpy()
    except Exception:  # Pillow raises several types for corrupt files, DecompressionBombError on a bomb
        return None


def _card(rows: list[dict[str, Any]], image_root: Path, classes: dict[str, str] | None = None) -> str:
    """One instance: its maps (one panel per explainer) over the image with both boxes, scores beneath.
    Image and maps are drawn on the raster the image is decoded to; the boxes stay in original pixels.
    A classifier's instance (`task` classify) draws only its object box (its own box is the whole image) and
    says what it is against `classes`, its image's predicted and true classes (`_image_classes`)."""
    first = rows[0]
    size = (first["height"], first["width"])
    width, height = fit_size(first["width"], first["height"], PANEL_PIXELS)
    image = _read_image(first["file_path"], image_root)
    missing_image = image is None or image.shape[:2] != (height, width)  # gone, or not the image audited
    if missing_image:
        image = np.full((height, width, 3), 128, np.uint8)
    panels = [Panel(row["explainer"], map_to_image(row["map"], Geometry.from_image_row(row, (row["grid_h"],
                                                                                                 row["grid_w"])),
                                                   raster=(height, width)),
                    None if row.get("peak_x") is None else (row["peak_x"], row["peak_y"]))
              for row in rows]
    pred = [first[k] for k in ("pred_x0", "pred_y0", "pred_x1", "pred_y1")]
    gt = [first[k] for k in ("gt_x0", "gt_y0", "gt_x1", "gt_y1")]
    classified, classes = first.get("task") == "classify", classes or {}
    if classified:
        png = overlay(image, panels, None, None if None in gt else gt, size=size,
                      gt_label=f"object box ({classes.get('true', 'true class')})")
    else:
        png = overlay(image, panels, pred, None if None in gt else gt,
                      pred_label="best-overlapping query's box" if first["outcome"] == "fn" else "predicted box",
                      size=size)
    scores = _table(["score", *(row["explainer"] for row in rows)],
                    [(c, *(row[c] for row in rows)) for c in CAPTION_SCORES if any(row[c] is not None for row in rows)])
    note = '<br><span class="note">image unavailable: maps drawn on grey</span>' if missing_image else ""
    name = Path(first["file_path"] or "?").name
    head = (f"<b>{html.escape(first['label_name'])}</b> · {html.escape(first['outcome'])} · "
            + (_class_head(first, classes) if classified
               else f"score {_format(first['score'])} · IoU {_format(first['iou'])}")
            + f"<br>instance {html.escape(first['instance_id'])} · {html.escape(name)}")
    layout = "failure" if len(rows) > 1 else "failure stacked"  # one map: caption beneath, two cards a row
    return (f'<figure class="{layout}" id="{html.escape(_card_id(first["instance_id"]))}" '
            f'data-instance="{html.escape(first["instance_id"])}">'
            f"{_img(png, 'saliency of ' + first['instance_id'], 'overlay')}"
            f"<figcaption>{head}{note}{scores}</figcaption></figure>")


def _class_head(row: dict[str, Any], classes: dict[str, str]) -> str:
    """A classifier's card head after its class and outcome: the class's probability and what the class is
    against the image's true class (or prediction, for the true class of a wrong one); escaped HTML."""
    label = row["label_name"]
    probability = f"p({html.escape(label)}) {_format(row['score'])}"
    role = OUTCOME_ROLES[row["outcome"]]
    if role == "tp":
        said = "the predicted class is the true class"
    elif role == "fp":
        said = (f"predicted, but the true class is <b>{html.escape(classes['true'])}</b>" if "true" in classes
                else "predicted, but the true class is none of the model's")
    elif role == "fn":
        said = (f"the true class, which the model missed: it said <b>{html.escape(classes['predicted'])}</b>"
                if "predicted" in classes else "the true class, which the model missed")
    else:
        said = "predicted; the image has no true class"
    return f"{probability}<br>{said}"


def _errors(store: Path, run_id: str) -> str:
    """Every errors row up to MAX_ERROR_ROWS, with the total when there are more."""
    total = query(store, "SELECT count(*) AS n FROM errors WHERE run_id = ?", [run_id]).column("n")[0].as_py()
    if total == 0:
        return '<p class="note">No errors.</p>'
    rows = query(store, "SELECT image_id, annotation_id, shard, stage, type, message, path FROM errors "
                        "WHERE run_id = ? ORDER BY shard, image_id, annotation_id LIMIT ?",
                 [run_id, MAX_ERROR_ROWS]).to_pylist()
    shown = f"the first {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    header = ["image_id", "annotation_id", "shard", "stage", "type", "message", "path"]
    return f'<p class="note">Showing {shown} rows.</p>' + _table(header, [[row[k] for k in header] for row in rows])
