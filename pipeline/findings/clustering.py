"""Candidate cues: per (explainer, class), the off-object peaks of flagged or localised instances described
(the detector's own projected backbone feature at the peak, the peak's position relative to the box, the
colour of the image there) and clustered (scikit-learn HDBSCAN). A cluster that many instances share is a
candidate cue.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.findings.flags import Case, InstanceKey
from eive_audit.pipeline.findings.verification import image_batches
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.models.detr import DetrAdapter


@dataclass(frozen=True)
class Peak:
    """A case's described peak: its descriptor [D + 8] (feature, position, colour) and a PNG crop around it."""

    case: Case
    descriptor: np.ndarray
    crop: bytes


def descriptor(image: torch.Tensor, features: torch.Tensor, geometry: Geometry, case: Case) -> np.ndarray:
    """The off-object peak of one instance as a vector: the projected backbone feature at the peak (unit norm;
    `features` [D, h, w] of a batch whose image `geometry` puts the image on that grid), the peak's position
    relative to the instance box (in box widths / heights from its centre), and the colour mean and std of the
    image under the peak window (in [0, 1]; `image` is the decoded picture, possibly a smaller copy)."""
    r, c = case.finding.peak  # type: ignore[misc]
    x0, y0, x1, y1 = case.geometry.cells_to_pixels(r, c, span=case.finding.peak_span)
    px0, py0, px1, py1 = case.geometry.cells_to_pixels(r, c, span=case.finding.peak_span,
                                                       raster=tuple(image.shape[-2:]))  # on the picture
    fy, fx = geometry.pixel_to_cell((x0 + x1) / 2, (y0 + y1) / 2)
    feature = features[:, fy, fx].float()
    feature = (feature / feature.norm().clamp(min=1e-6)).cpu().numpy()
    bx0, by0, bx1, by1 = case.box
    position = [((x0 + x1) / 2 - (bx0 + bx1) / 2) / max(bx1 - bx0, 1.0),
                ((y0 + y1) / 2 - (by0 + by1) / 2) / max(by1 - by0, 1.0)]
    patch = image[:, py0:py1, px0:px1].float().flatten(1) / 255
    colour = torch.cat([patch.mean(1), patch.std(1, correction=0)]).numpy()
    return np.concatenate([feature, position, colour]).astype(np.float32)


def crop(image: torch.Tensor, case: Case, scale: int = 4) -> bytes:
    """PNG bytes of the decoded picture around an instance's peak window and one cell around it, enlarged for
    viewing."""
    r, c = case.finding.peak  # type: ignore[misc]
    x0, y0, x1, y1 = case.geometry.cells_to_pixels(r, c, radius=1, span=case.finding.peak_span,
                                                   raster=tuple(image.shape[-2:]))
    patch = Image.fromarray(image[:, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy())
    patch = patch.resize((patch.width * scale, patch.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    patch.save(buffer, format="PNG")
    return buffer.getvalue()


def describe_peaks(adapter: DetrAdapter, cases: list[Case], images: dict[int, dict[str, Any]],
                   batch_size: int) -> list[Peak]:
    """Each case's peak described and cropped (one feature forward per batch of images), in the order of
    `cases`: the order the clustering sees them in."""
    peaks: dict[InstanceKey, Peak] = {}
    for part in image_batches(adapter, cases, images, batch_size, "findings: describing peaks"):
        with torch.inference_mode():
            features = adapter.record(part.batch, gradients=False).features
        for b, (picture, mine) in enumerate(zip(part.pictures, part.cases)):
            geometry = Geometry.from_batch(part.batch, b, tuple(features.shape[-2:]))
            peaks |= {case.key: Peak(case, descriptor(picture, features[b], geometry, case), crop(picture, case))
                      for case in mine}
    return [peaks[case.key] for case in cases]


def cluster_peaks(descriptors: np.ndarray, config: FindingsConfig) -> np.ndarray:
    """Cluster labels (-1 for noise) of peak descriptors [n, D + 8]: the feature part is reduced by PCA,
    then every column standardised, so feature, position and colour weigh alike; HDBSCAN needs no cluster
    count and leaves one-off peaks unclustered."""
    if len(descriptors) < config.min_support:
        return np.full(len(descriptors), -1)
    features, rest = descriptors[:, :-8], descriptors[:, -8:]
    dims = min(config.feature_dims, features.shape[1], len(descriptors) - 1)
    from sklearn.cluster import HDBSCAN  # here: scikit-learn (with scipy, pandas) costs seconds to import
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    reduced = PCA(n_components=dims, random_state=0).fit_transform(features) if dims > 0 else features[:, :0]
    x = StandardScaler().fit_transform(np.concatenate([reduced, rest], axis=1))
    labels = HDBSCAN(min_cluster_size=config.min_support, min_samples=config.min_support, copy=True).fit_predict(x)
    if labels.max() < 0:
        # By default HDBSCAN never returns the whole tree as one cluster, so a class whose peaks hold a single
        # dense group among scattered ones (one cue, a small run) would get none. Asking for the single cluster
        # only when nothing else came back keeps two distinct groups apart; sklearn then labels the group's
        # densest core, which verification confirms or not like any cluster.
        labels = HDBSCAN(min_cluster_size=config.min_support, min_samples=config.min_support, copy=True,
                         allow_single_cluster=True).fit_predict(x)
    return labels


@dataclass
class Cue:
    """A candidate cue: a cluster of one (explainer, class)'s peaks, its members largest cluster first."""

    cue_id: str
    explainer: str
    label_name: str
    members: list[Peak]
    flagged_in_class: int
    exemplars: list[Peak]

    def row(self, config: FindingsConfig) -> dict[str, Any]:
        """The cue as a `findings` table row (after the members' spurious scores are filled)."""
        centre = np.stack([p.descriptor for p in self.members]).mean(0)
        findings = [p.case.finding for p in self.members]
        drops = [f.verification_drop for f in findings if f.verification_drop is not None]
        return {
            "cue_id": self.cue_id, "explainer": self.explainer, "label_name": self.label_name,
            "support": len(self.members), "flagged_in_class": self.flagged_in_class,
            "offset_x": float(centre[-8]), "offset_y": float(centre[-7]),
            "colour_mean": [float(v) for v in centre[-6:-3]], "colour_std": [float(v) for v in centre[-3:]],
            "exemplar_ids": [p.case.row["instance_id"] for p in self.exemplars],
            "exemplar_crops": [p.crop for p in self.exemplars],
            "mean_spurious_score": float(np.mean([f.spurious_score for f in findings])),
            "verified": len(drops), "verification_drop": float(np.mean(drops)) if drops else None,
            "confirmed": bool(drops) and float(np.mean(drops)) >= config.confirm_drop,
        }


def cluster_cues(peaks: list[Peak], config: FindingsConfig) -> list[Cue]:
    """Cluster the peaks per (explainer, class), naming each member's `cue_id`; each cluster is a candidate
    cue (largest first), its exemplars the members nearest its centre."""
    groups: dict[tuple[str, str], list[Peak]] = {}
    for peak in peaks:
        groups.setdefault((peak.case.row["explainer"], peak.case.row["label_name"]), []).append(peak)
    cues = []
    for (explainer, label), of_class in sorted(groups.items()):
        labels = cluster_peaks(np.stack([p.descriptor for p in of_class]), config)
        clusters = sorted({int(l) for l in labels if l >= 0}, key=lambda l: (-int((labels == l).sum()), l))
        for rank, cluster in enumerate(clusters):
            members = [p for p, l in zip(of_class, labels) if l == cluster]
            cue_id = f"{explainer}:{label}:{rank}"
            for peak in members:
                peak.case.finding.cue_id = cue_id
            vectors = np.stack([p.descriptor for p in members])
            nearest = np.argsort(((vectors - vectors.mean(0)) ** 2).sum(1), kind="stable")[:config.exemplars]
            cues.append(Cue(cue_id, explainer, label, members, len(of_class), [members[i] for i in nearest]))
    return cues
