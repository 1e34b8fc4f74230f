"""The review commands through the real CLI: `run --config` with a flag over the file, the HTML report, the
Prefect artifacts of the run, `push` to FiftyOne, and the clear errors (exit code 2) of each; plus the YAML
config loader those commands stand on.

The audit runs in this process (typer's CliRunner) under the session's Prefect test harness, so its
artifacts are read back through the same Prefect API. FiftyOne runs only in a subprocess against the
session's mongod, so this process never imports it (FiftyOne fixes its database at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from cli import CLI, invoke as _invoke, run_ok as _run_ok
from eive_audit.pipeline.config import EXPLAINER_SETTINGS, AuditConfig, ConfigFileError, merge_settings
from eive_audit.reports.artifacts import WORST_LIMIT, artifact_key
from eive_audit.storage.catalog import query

N_IMAGES = 8

pytestmark = pytest.mark.xdist_group("cli-review")  # one `audited` run for the module


@pytest.fixture(scope="module")
def audited(synth: Path, synth_val_subset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`run --config configs/audit.yaml --score-threshold 0.3` on 8 synthetic images, where the file says 0.5
    and holds paths relative to itself; the run's summary, paths, and its artifacts read back."""
    folder = tmp_path_factory.mktemp("review")
    coco = synth_val_subset(N_IMAGES, folder / "val8.json")
    yaml_file = folder / "configs" / "audit.yaml"
    yaml_file.parent.mkdir()
    images = os.path.relpath(synth / "images" / "val", yaml_file.parent)
    yaml_file.write_text(f"images: {images}\ncoco: ../{coco.name}\nout: ../store\nexplainers: [eive]\n"
                         "score_threshold: 0.5\nshard_size: 1000\ndevice: cpu\n")
    summary = _run_ok("--config", str(yaml_file), "--score-threshold", "0.3")
    artifacts = _artifacts(summary["run_id"])
    return {"summary": summary, "yaml": yaml_file, "store": folder / "store", "synth": synth,
            "artifacts": {a.key: a for a in artifacts}}


def _artifacts(run_id: str) -> list:
    """Every version of the run's artifacts, newest first."""
    keys = [artifact_key("audit", run_id, part) for part in ("summary", "worst")]
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
                                     sort=ArtifactSort.CREATED_DESC)


def test_run_takes_the_yaml_file_and_a_flag_given_on_the_command_line_wins(audited: dict) -> None:
    summary, store = audited["summary"], audited["store"]
    expected = AuditConfig.from_yaml(audited["yaml"], score_threshold=0.3)
    assert summary["run_id"] == expected.run_id != AuditConfig.from_yaml(audited["yaml"]).run_id
    stored = json.loads(query(store, "SELECT config_json FROM runs WHERE run_id = ?",
                              [summary["run_id"]]).column("config_json")[0].as_py())
    assert stored["score_threshold"] == 0.3, "the flag overrides the file"
    assert stored["shard_size"] == 1000 and stored["device"] == "cpu", "the file overrides the defaults"
    assert stored["max_detections"] == 100, "neither: AuditConfig's default, not a flag's"
    assert Path(stored["images"]) == (audited["synth"] / "images" / "val").resolve(), "relative to the YAML file"
    assert summary["images"] == N_IMAGES and summary["errors"] == 0


def test_every_run_writes_its_html_report(audited: dict) -> None:
    summary, store = audited["summary"], audited["store"]
    report = Path(summary["report"])
    assert report == store / "reports" / f"{summary['run_id']}.html"
    assert summary["run_id"] in report.read_text()


def test_the_flow_leaves_a_summary_and_a_worst_detections_artifact(audited: dict) -> None:
    run_id, store, artifacts = audited["summary"]["run_id"], audited["store"], audited["artifacts"]
    assert sorted(artifacts) == [f"audit-{run_id}-summary", f"audit-{run_id}-worst"]
    markdown = artifacts[f"audit-{run_id}-summary"].data
    assert f"| images | {N_IMAGES} |" in markdown
    assert f"`{audited['summary']['report']}`" in markdown and "| FiftyOne dataset | not pushed |" in markdown
    assert f"]({Path(audited['summary']['report']).as_uri()})" in markdown, "the report is a link"
    flagged = query(store, "SELECT count(*) FILTER (flag_off_object OR flag_background_fp OR flag_miss_elsewhere) "
                           "FROM instances WHERE run_id = ?", [run_id]).column(0)[0].as_py()
    assert f"| flagged instances | {flagged} (off object " in markdown
    cues = query(store, "SELECT count(*) FROM findings WHERE run_id = ?", [run_id]).column(0)[0].as_py()
    assert f"| candidate cues | {cues} (" in markdown
    table = json.loads(artifacts[f"audit-{run_id}-worst"].data)
    tps = query(store, "SELECT mass_in_gt FROM instances WHERE run_id = ? AND outcome = 'tp'", [run_id]).column(0)
    assert len(table) == min(WORST_LIMIT, len(tps)) > 0
    masses = [row["mass_in_gt"] for row in table]
    assert masses == sorted(masses) and masses[0] == round(min(tps.to_pylist()), 3), "least mass on the object first"


def test_run_with_a_fiftyone_dataset_pushes_at_the_end_of_the_flow(audited: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow's wiring, with FiftyOne's push recorded instead of run (the real push: the `push` test below)."""
    pushed = []
    fake = types.ModuleType("eive_audit.reports.fiftyone_push")
    fake.push_run = lambda store, run_id, dataset: pushed.append((Path(store), run_id, dataset)) or {}
    monkeypatch.setitem(sys.modules, "eive_audit.reports.fiftyone_push", fake)
    summary = _run_ok("--config", str(audited["yaml"]), "--score-threshold", "0.3", "--fiftyone-dataset", "nightly",
                      "--no-report")
    run_id = audited["summary"]["run_id"]
    assert summary["run_id"] == run_id and summary["shards_skipped"] == 1, "review settings leave the run id alone"
    assert pushed == [(audited["store"].resolve(), run_id, "nightly")]
    assert (summary["fiftyone_dataset"], summary["report"]) == ("nightly", None)
    newest = _artifacts(run_id)[:2]
    assert "| FiftyOne dataset | `nightly`: `eive-audit app --dataset nightly` |" in next(
        a.data for a in newest if a.key.endswith("-summary")), "the dataset and the command that opens it"


def test_report_writes_the_latest_finished_run_when_no_run_is_named(audited: dict, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "report.html"
    code, stdout, stderr = _invoke("report", "--store", str(audited["store"]), "--out", str(out))
    assert code == 0, stderr
    assert Path(stdout.strip()) == out and audited["summary"]["run_id"] in out.read_text()


@pytest.mark.parametrize("command", ["report", "push"])
def test_an_unknown_run_or_a_missing_store_exits_2_with_a_message(audited: dict, command: str, tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path / "r.html")] if command == "report" else ["--dataset", "never-made"]
    code, _, stderr = _invoke(command, "--store", str(audited["store"]), "--run", "nope", *extra)
    assert code == 2 and "no finished run 'nope'" in stderr and audited["summary"]["run_id"] in stderr
    code, _, stderr = _invoke(command, "--store", str(tmp_path / "absent"), *extra)
    assert code == 2 and "no store at" in stderr
    assert not (tmp_path / "r.html").exists()


def test_run_names_an_unknown_key_and_a_missing_setting(tmp_path: Path) -> None:
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("images: imgs\nout: store\nscore_treshold: 0.2\n")
    code, _, stderr = _invoke("run", "--config", str(yaml_file))
    assert code == 2 and "unknown key 'score_treshold'" in stderr
    code, _, stderr = _invoke("run", "--out", str(tmp_path / "store"))
    assert code == 2 and "images: Field required" in stderr


def test_push_puts_the_latest_run_into_a_fiftyone_dataset(audited: dict, fiftyone_env: dict[str, str]) -> None:
    result = subprocess.run([*CLI, "push", "--store", str(audited["store"]), "--dataset", "review"],
                            env=fiftyone_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    pushed = json.loads(result.stdout)  # stdout is the JSON alone: FiftyOne's notices go to stderr
    n_instances = query(audited["store"], "SELECT count(*) AS n FROM instances WHERE run_id = ?",
                        [audited["summary"]["run_id"]]).column("n")[0].as_py()
    assert pushed["run_id"] == audited["summary"]["run_id"] and pushed["dataset"] == "review"
    assert (pushed["images"], pushed["instances"]) == (N_IMAGES, n_instances)


# --- the YAML config ------------------------------------------------------------------------------------------

_configs = st.builds(
    AuditConfig,
    images=st.sampled_from([Path("/data/images"), Path("/data/other images")]),
    coco=st.none() | st.just(Path("/data/ann.json")),
    out=st.just(Path("/stores/audit")),
    model=st.sampled_from(["default", "/models/none-here"]),
    explainers=st.fixed_dictionaries({"eive": st.fixed_dictionaries({"fusion": st.sampled_from(["clhcf", "last", "mean"])})}),
    score_threshold=st.floats(0, 1),
    max_detections=st.integers(1, 300),
    shard_size=st.integers(1, 10_000),
    faithfulness=st.fixed_dictionaries({"instances": st.sampled_from(["none", "all", "flagged", "sample:12"])}),
    review=st.fixed_dictionaries({"fiftyone_dataset": st.none() | st.text(min_size=1, max_size=20),
                                  "report": st.booleans()}),
)


@settings(max_examples=25, deadline=None)
@given(config=_configs)
def test_a_config_dumped_to_yaml_loads_back_equal_with_the_same_run_id(config: AuditConfig, tmp_path_factory) -> None:
    loaded = AuditConfig.from_yaml(config.to_yaml(tmp_path_factory.mktemp("yaml") / "c.yaml"))
    assert loaded == config and loaded.run_id == config.run_id


def test_relative_paths_resolve_against_the_yaml_files_folder_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "model").mkdir()
    yaml_file = tmp_path / "cfg" / "a.yaml"
    yaml_file.write_text("images: imgs\ncoco: ../ann.json\nout: /abs/store\nmodel: model\n")
    monkeypatch.chdir("/")
    config = AuditConfig.from_yaml(yaml_file, out=Path("/elsewhere"))
    assert (config.images, config.coco, config.out) == (tmp_path / "cfg" / "imgs", tmp_path / "ann.json", Path("/elsewhere"))
    assert config.model == str(tmp_path / "cfg" / "model"), "a model folder beside the file"
    assert AuditConfig.from_yaml(yaml_file, model="facebook/detr-resnet-50").model == "facebook/detr-resnet-50"


@pytest.mark.parametrize("text, message", [("images: [a\n", "cannot read config"), ("- a\n- b\n", "must be a mapping"),
                                           ("images: a\nout: b\nbogus: 1\n", "unknown key 'bogus'")])
def test_a_bad_yaml_file_is_named_with_its_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        AuditConfig.from_yaml(tmp_path / "c.yaml")


def test_review_settings_leave_the_run_id_unchanged_and_findings_settings_change_it() -> None:
    config = AuditConfig(images=Path("/nonexistent/images"), coco=Path("/nonexistent/ann.json"),
                         out=Path("/nonexistent/store"), model="/nonexistent/model", score_threshold=0.25,
                         faithfulness={"instances": "sample:7"})
    def changed(**settings: object) -> AuditConfig:
        return AuditConfig(**merge_settings(config.model_dump(), settings))

    assert changed(review={"fiftyone_dataset": "x", "report": False}).run_id == config.run_id
    assert changed(faithfulness={"batch_size": 3}, explainers={"eive": {}}).run_id == config.run_id
    for change in ({"findings": {"off_object": 0.45}}, {"findings": {"forward_budget": 3.0}},
                   {"findings": {"enabled": False}}, {"explainers": {"drise": {"n_masks": 7}}},
                   {"explainers": {"eive": {"fusion": "last"}}}, {"faithfulness": {"steps": 3}}):
        assert changed(**change).run_id != config.run_id, change


def test_annotations_edited_in_place_start_a_new_run(tmp_path: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    config = AuditConfig(images=tmp_path, coco=ann, out=tmp_path / "store")
    before = config.run_id
    ann.write_text('{"images": []}')
    assert config.run_id != before


def test_artifact_keys_are_lowercase_letters_digits_and_dashes() -> None:
    assert artifact_key("Audit", "9a0E_f.2", "worst") == "audit-9a0e-f-2-worst"
    with pytest.raises(ValueError):
        artifact_key("__", "..")


def test_demo_audits_fresh_synthetic_data_and_shows_what_to_review(tmp_path: Path,
                                                                  subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "demo-store"
    # The demo as a user runs it, in a fresh interpreter; it reports to the session's Prefect server (a real
    # `run` starting its own temporary one, on a fresh home and two at once, is tests/test_process.py's).
    done = subprocess.run([*CLI, "demo", "--out", str(out), "--n-val", "16"], capture_output=True, text=True,
                          env=subprocess_env, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = done.stdout.splitlines()  # stdout is the summary alone, for machines; the rest goes to stderr
    summary = json.loads(line)
    assert (summary["images"], summary["errors"]) == (16, 0)
    assert Path(summary["report"]).is_file()
    stderr = " ".join(done.stderr.split())
    assert "right or wrong for the wrong reason" in stderr and "Candidate cues" in stderr
    for step in ("rendering: 16/16 done in", "auditing images: 16/16 done in", "findings: verifying:",
                 "findings: 1/1 done in", "writing the report: done in"):  # off a terminal: one line a step
        assert stderr.count(step) == 1, step
    cues = query(out, "SELECT cue_id FROM findings WHERE run_id = ?", [summary["run_id"]]).column("cue_id")
    assert len(cues) == summary["candidate_cues"]
    assert all(cue in done.stderr for cue in cues.to_pylist()), "every candidate cue is printed"
    worst = query(out, "SELECT instance_id FROM instances WHERE run_id = ? AND outcome = 'tp' ORDER BY mass_in_gt "
                       "LIMIT 1", [summary["run_id"]]).column("instance_id")[0].as_py()
    assert worst in done.stderr, "the tp least on its object heads the first table"


def test_a_demo_with_a_mistyped_flag_stops_in_one_line_before_rendering_anything(tmp_path: Path) -> None:
    result = _invoke("demo", "--task", "clasify", "--out", tmp_path / "demo-store")
    assert result.code == 2 and "did you mean 'classify'" in result.stderr, result.stderr
    assert not (tmp_path / "demo-store").exists(), "no data rendered for a demo that cannot run"


def test_the_config_schema_admits_every_explainers_parameters() -> None:
    """A Prefect server checks a deployment's parameters against this schema before any run starts."""
    import jsonschema

    explainers = {name: kind().model_dump() for name, kind in EXPLAINER_SETTINGS.items()} | {"rollout": {}}
    config = AuditConfig(images=Path("/data/images"), out=Path("/stores/audit"), explainers=explainers)
    assert {type(config.explainers[name]) for name in EXPLAINER_SETTINGS} == set(EXPLAINER_SETTINGS.values())
    jsonschema.validate(json.loads(config.model_dump_json()), AuditConfig.model_json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(config.model_dump_json()), "explainers": {"eive": {"fusion": "median"}}},
                            AuditConfig.model_json_schema())
