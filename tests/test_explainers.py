"""The baseline explainers: the map contract on every supported family, exactness of the batched gradient
rounds, hand-computed propagation and D-RISE scores, query sensitivity on the shipped model, hooks and model
state left as found (also when explain raises), and an audit end to end with several explainers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from eive_audit.explainers import available, get_explainer, needs_of
from eive_audit.explainers.drise import DRise, detection_similarity, smooth_masks
from eive_audit.explainers.rollout import relevance
from eive_audit.pipeline.config import AhaSettings, DriseSettings
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.metrics.localization import box_coverage
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.families import _SMALL_BACKBONE, FAMILIES
from eive_audit.pipeline.models.preprocess import PixelBatch, PreprocessConfig
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.sources.synthetic import SynthParams, make_scene, render

# What the package promises (the registry test checks it); the contract tests below run on whatever the
# registry holds, so a method added there is held to them too.
BASELINES = ("raw-attention", "rollout", "chefer", "odam", "drise", "legrad-detr", "cdam-detr")
GRADIENT = ("chefer", "odam", "legrad-detr", "cdam-detr")
# The detection explainers (EIVE has tests/test_eive.py; the ViT ones tests/test_vit_explainers.py)
REGISTERED = [name for name in available() if name != "eive" and "detect" in needs_of(name).tasks]
DENSE_FAMILIES = [name for name, family in FAMILIES.items() if not family.deformable and not name.endswith("-small")]
FAST_DRISE = {"n_masks": 8, "batch_size": 8}

pytestmark = pytest.mark.xdist_group("explainers")  # the module's forwards, once


def _explainer(name: str, adapter: DetrAdapter | None = None):
    """The explainer `name`; aha reads a directory made for `adapter`: an untrained decoder's (what it learns
    is tests/test_aha.py's), written once per model."""
    if name == "aha" and adapter is not None:
        return get_explainer(name, AhaSettings(model=_untrained_aha(adapter)))
    return get_explainer(name, DriseSettings(**FAST_DRISE) if name == "drise" else None)


_AHA_DIRS: dict[int, Path] = {}


def _untrained_aha(adapter: DetrAdapter) -> Path:
    from eive_audit.pipeline.models.aha import (AhaDecoder, LossSettings, architecture_for, save_explainer,
                                               weights_fingerprint)

    if id(adapter.model) not in _AHA_DIRS:
        out = Path(tempfile.mkdtemp(prefix="aha-"))
        torch.manual_seed(0)
        save_explainer(out, AhaDecoder(architecture_for(adapter, hidden=8)), LossSettings(4, 5, 0.0025, "blur", 10.0, 0.3),
                       weights_fingerprint(adapter.model), "test model")
        _AHA_DIRS[id(adapter.model)] = out
    return _AHA_DIRS[id(adapter.model)]


def _tiny(family: str) -> DetrAdapter:
    """A random-init model of `family`'s own transformer classes, shrunk (the shipped model's two-stage
    ResNet, d_model 64, 2 + 2 layers, 12 queries) so that each explain takes a moment."""
    torch.manual_seed(0)
    spec = FAMILIES[family]
    labels = ["a", "b", "c"]
    width = "hidden_size" if spec.model_type == "dab-detr" else "d_model"
    config = spec.config_class(
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, **_SMALL_BACKBONE,
        **{width: 64}, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12,
        **({} if spec.model_type == "dab-detr" else {"use_pretrained_backbone": False}))
    config._attn_implementation = "eager"
    return DetrAdapter(spec.model_class(config), PreprocessConfig(96, 160), torch.device("cpu"))


def _padded_forward(adapter: DetrAdapter) -> tuple:
    """Two images of different aspect ratios (so some grid cells are padding), two targets each."""
    torch.manual_seed(1)
    images = [torch.randint(0, 255, (3, 96, 160), dtype=torch.uint8),
              torch.randint(0, 255, (3, 120, 96), dtype=torch.uint8)]
    batch = adapter.preprocess(images)
    with torch.inference_mode():
        outputs = adapter.forward(batch)
    b, q = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 7, 3, 7])
    targets = Targets(batch_index=b, query=q, label=torch.tensor([0, 2, 1, 2]), box=outputs.boxes[b, q].float().clone())
    return adapter, batch, outputs, targets


@pytest.fixture(scope="module", params=DENSE_FAMILIES)
def family_forward(request: pytest.FixtureRequest) -> tuple:
    return _padded_forward(_tiny(request.param))


@pytest.fixture(scope="module")
def small_forward() -> tuple:
    return _padded_forward(_tiny("conditional-detr"))


@pytest.fixture(scope="module")
def shipped() -> tuple:
    """The shipped model on a synthetic image with three objects, its kept detections as targets."""
    adapter = DetrAdapter.load("default", device="cpu")
    params = SynthParams(min_objects=3)
    image = torch.from_numpy(np.array(render(make_scene(5, "val", 0, params), params))).permute(2, 0, 1)
    batch = adapter.preprocess([image])
    with torch.inference_mode():
        outputs = adapter.forward(batch)
        detections = adapter.postprocess(outputs, batch, score_threshold=0.5)[0]
    k = len(detections.queries)
    assert k == 3, "the fixture image must give three detections"
    targets = Targets(torch.zeros(k, dtype=torch.long), detections.queries.clone(), detections.labels.clone(),
                      outputs.boxes[0, detections.queries].float().clone())
    grid_boxes = Geometry.from_batch(batch, 0, outputs.grid).to_grid(detections.boxes)
    return adapter, batch, outputs, targets, box_coverage(grid_boxes, outputs.grid)


def test_registry_holds_every_baseline_with_its_gradient_flag() -> None:
    assert set(BASELINES) | {"eive"} <= set(available())
    for name in BASELINES:
        assert _explainer(name).needs.gradients is (name in GRADIENT), name
        assert _explainer(name).name == name


@pytest.mark.parametrize("name", REGISTERED)
def test_maps_are_non_negative_on_the_grid_and_zero_on_padding(family_forward: tuple, name: str) -> None:
    adapter, batch, outputs, targets = family_forward
    maps = _explainer(name, adapter).explain(adapter, batch, outputs, targets)
    assert maps.shape == (len(targets), *outputs.grid) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    padding = ~outputs.token_mask[targets.batch_index]
    assert padding.any(), "the fixture must contain padding"
    assert (maps[padding] == 0).all()
    assert (maps.flatten(1).sum(-1) > 0).all(), "every target gets a map with some mass"
    assert not maps.requires_grad


@pytest.mark.parametrize("name", REGISTERED)
def test_no_targets_give_no_maps(small_forward: tuple, name: str) -> None:
    adapter, batch, outputs, _ = small_forward
    empty = Targets(*(torch.zeros(0, dtype=torch.long) for _ in range(3)), box=torch.zeros(0, 4))
    assert _explainer(name, adapter).explain(adapter, batch, outputs, empty).shape == (0, *outputs.grid)


@pytest.mark.parametrize("name", GRADIENT)
def test_rounds_of_targets_equal_one_target_at_a_time(small_forward: tuple, name: str) -> None:
    """All targets share one forward and one backward per round (one target per image); each map must
    equal the map of that target explained alone, also when the call is made under inference mode."""
    adapter, batch, outputs, targets = small_forward
    with torch.inference_mode():
        together = _explainer(name, adapter).explain(adapter, batch, outputs, targets)
    for k in range(len(targets)):
        alone = Targets(*(t[k:k + 1] for t in (targets.batch_index, targets.query, targets.label, targets.box)))
        torch.testing.assert_close(together[k:k + 1], _explainer(name, adapter).explain(adapter, batch, outputs, alone),
                                   atol=1e-6, rtol=1e-4)


def test_gradient_explainers_refuse_a_train_mode_model(small_forward: tuple) -> None:
    adapter, batch, outputs, targets = small_forward
    adapter.model.train()
    try:
        with pytest.raises(ValueError, match="eval-mode"):
            _explainer("chefer").explain(adapter, batch, outputs, targets)
    finally:
        adapter.model.eval()


@pytest.mark.parametrize("name", ["chefer", "legrad-detr"])
def test_maps_follow_the_target_query(shipped: tuple, name: str) -> None:
    adapter, batch, outputs, targets, coverage = shipped
    maps = _explainer(name, adapter).explain(adapter, batch, outputs, targets)
    dist = maps.flatten(1) / maps.flatten(1).sum(-1, keepdim=True)
    distance = (dist[:, None] - dist[None]).abs().sum(-1)  # L1 between normalised maps, [K, K]
    off_diagonal = distance[~torch.eye(len(targets), dtype=torch.bool)]
    assert (off_diagonal > 0.02).all(), f"maps of different queries must differ: {distance}"
    if name == "chefer":  # each map puts more of its mass on its own detection than on any other
        mass = dist @ coverage.flatten(1).T  # [map, box]
        assert (mass.argmax(1) == torch.arange(len(targets))).all(), mass


def test_relevance_by_hand() -> None:
    # No encoder layer: R_ii = I and norm(I) = I. One decoder layer with row-stochastic self-attention S:
    # R_qq = I + S, norm(R_qq) = rownorm(S) + I = S + I, so R_qi = (I + S)^T C.
    s = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    c = torch.tensor([[[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]])
    expected = torch.tensor([[[0.3, 1.2, 0.0], [0.1, 0.4, 2.0]]])
    torch.testing.assert_close(relevance([], [s], [c]), expected)
    # One encoder layer A (row-stochastic): R_ii = I + A, norm(R_ii) = A + I; with S = 0, R_qi = C (I + A).
    a = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]])
    torch.testing.assert_close(relevance([a], [torch.zeros(1, 2, 2)], [c]), c @ (torch.eye(3) + a))


def test_drise_similarity_by_hand() -> None:
    # One softmax query on the target box with probs (0.6, 0.2) for class 0: IoU 1, cos = 0.6 / |(0.6, 0.2)|,
    # objectness 1 - p(no-object) = 0.8. A second query far away scores 0.
    probs = torch.tensor([[[0.6, 0.2], [0.9, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    box, label = torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([0])
    expected = 0.6 / (0.6**2 + 0.2**2) ** 0.5 * 0.8
    torch.testing.assert_close(detection_similarity(probs, boxes, label, box, sigmoid_classes=False),
                               torch.tensor([[expected]]))
    # Sigmoid heads: objectness = 1 - (1 - 0.6)(1 - 0.2) = 0.68.
    torch.testing.assert_close(detection_similarity(probs, boxes, label, box, sigmoid_classes=True),
                               torch.tensor([[expected / 0.8 * 0.68]]))


def test_smooth_masks_keep_all_or_nothing_and_stay_in_range() -> None:
    shifts = torch.tensor([[0.0, 0.0], [0.7, 0.3]])
    ones = smooth_masks(torch.ones(2, 4, 4), shifts, (30, 50))
    assert ones.shape == (2, 30, 50) and torch.allclose(ones, torch.ones_like(ones))
    assert (smooth_masks(torch.zeros(2, 4, 4), shifts, (30, 50)) == 0).all()
    random = smooth_masks((torch.rand(2, 4, 4) < 0.5).float(), shifts, (30, 50))
    assert random.min() >= 0 and random.max() <= 1


def test_drise_is_deterministic_for_a_seed(small_forward: tuple) -> None:
    adapter, batch, outputs, targets = small_forward
    first = DRise(DriseSettings(n_masks=8, batch_size=16, seed=3)).explain(adapter, batch, outputs, targets)
    torch.testing.assert_close(DRise(DriseSettings(n_masks=8, batch_size=5, seed=3)).explain(adapter, batch, outputs, targets), first)
    assert not torch.allclose(DRise(DriseSettings(n_masks=8, batch_size=16, seed=4)).explain(adapter, batch, outputs, targets), first)


def _hooks(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


@pytest.mark.parametrize("name", REGISTERED)
def test_hooks_and_model_state_are_left_as_found_also_on_error(small_forward: tuple, name: str) -> None:
    adapter, batch, outputs, targets = small_forward
    explainer = _explainer(name, adapter)
    explainer.explain(adapter, batch, outputs, targets)  # warm-up: transformers adds its own hooks once
    before = _hooks(adapter.model)
    explainer.explain(adapter, batch, outputs, targets)
    assert _hooks(adapter.model) == before
    out_of_range = Targets(targets.batch_index, targets.query + 1000, targets.label + 1000, targets.box)
    with pytest.raises((IndexError, RuntimeError)):  # raised after the explainer's own forward, if it has one
        explainer.explain(adapter, batch, outputs, out_of_range)
    assert _hooks(adapter.model) == before
    if name != "raw-attention":  # every other method runs the model: make that forward raise
        two_channels = PixelBatch(batch.pixel_values[:, :2], batch.pixel_mask, batch.input_sizes, batch.original_sizes)
        with pytest.raises(ValueError, match="channel"):
            explainer.explain(adapter, two_channels, outputs, targets)
        assert _hooks(adapter.model) == before
    assert not adapter.model.training
    assert all(p.grad is None for p in adapter.model.parameters()), "gradients are taken, never accumulated"


def test_audit_runs_end_to_end_with_several_explainers(synth: Path, tmp_path: Path) -> None:
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.storage.catalog import query
    from eive_audit.storage.maps import decode_map

    coco = json.loads((synth / "annotations" / "val.json").read_text())
    keep = {image["id"] for image in coco["images"][:4]}
    subset = tmp_path / "val4.json"
    subset.write_text(json.dumps({**coco, "images": [i for i in coco["images"] if i["id"] in keep],
                                  "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}))
    names = ("eive", "chefer", "drise")
    config = AuditConfig(images=synth / "images" / "val", coco=subset, out=tmp_path / "store",
                         max_detections=3, batch_size=2, shard_size=2, device="cpu",
                         explainers={"eive": {}, "chefer": {}, "drise": {"n_masks": 8}}, review={"report": False})
    summary = audit(config)
    assert summary["images"] == 4 and summary["errors"] == 0
    per_explainer = query(config.out, "SELECT explainer, count(*) AS n, count(DISTINCT instance_id) AS ids, "
                                      "avg(mass_in_gt) AS epg FROM instances WHERE run_id = ? GROUP BY explainer",
                          [config.run_id]).to_pylist()
    counts = {row["explainer"]: row["n"] for row in per_explainer}
    assert set(counts) == set(names) and len(set(counts.values())) == 1 and counts["eive"] > 0
    assert all(row["ids"] == row["n"] and 0 < row["epg"] <= 1 for row in per_explainer)
    maps = query(config.out, "SELECT grid_h, grid_w, map FROM maps WHERE run_id = ?", [config.run_id]).to_pylist()
    assert len(maps) == sum(counts.values())
    for row in maps:
        decoded = decode_map(row["map"], row["grid_h"], row["grid_w"])
        assert decoded.shape == (16, 16) and (decoded >= 0).all() and decoded.sum() > 0
