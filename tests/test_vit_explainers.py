"""The ViT explainers (legrad, cdam, cdam-smooth, cdam-integrated, rollout, raw-attention) on tiny random-init
transformers, timm (with register tokens) and OpenCLIP ViTs: the map contract, batching, no gradients or
hooks left behind, and each method against a reference: legrad-torch's LeGrad, a slow per-token autograd
CDAM, and the reductions of smooth (zero noise) and integrated (one step) CDAM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_vit_models import images, write_tiny_models

from eive_audit.explainers.base import get_explainer
from eive_audit.pipeline.config import CdamIntegratedSettings, CdamSmoothSettings, ExplainerSettings
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ViTAdapter

KINDS = ("vit", "timm", "open_clip")
EXPLAINERS = {
    "legrad": None, "cdam": None, "rollout": None, "raw-attention": None,
    "cdam-smooth": CdamSmoothSettings(n_samples=4, noise=0.1, batch_size=3),  # 3 rows per forward: chunks cut copies
    "cdam-integrated": CdamIntegratedSettings(steps=4, batch_size=5),
}
# Two targets on image 0 (two rounds of gradients), one on each other image.
BATCH_INDEX, LABELS = [0, 0, 1, 2], [0, 2, 1, 0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ViTAdapter]:
    dirs = write_tiny_models(tmp_path_factory.mktemp("vit_explainers"), KINDS)
    return {kind: ViTAdapter.load(path, "cpu") for kind, path in dirs.items()}


def targets_of(batch_index: list[int], labels: list[int]) -> Targets:
    k = len(labels)
    return Targets(torch.tensor(batch_index, dtype=torch.long), torch.zeros(k, dtype=torch.long),
                   torch.tensor(labels, dtype=torch.long),
                   torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(k, 4))


def explain(adapter: ViTAdapter, name: str, pictures: list[torch.Tensor], targets: Targets,
            settings: ExplainerSettings | None = None) -> torch.Tensor:
    """As the audit calls an explainer (with `settings`, else this module's test settings for it): after an
    inference-mode forward, itself in inference mode."""
    with torch.inference_mode():
        batch = adapter.preprocess(pictures)
        chosen = settings if settings is not None else EXPLAINERS.get(name)
        return get_explainer(name, chosen).explain(adapter, batch, adapter.forward(batch), targets)


def hooks(adapter: ViTAdapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in adapter.model.modules())


def check_map_contract(adapter: ViTAdapter, name: str, atol: float) -> None:
    """Every ViT explainer's contract (tests/test_vit_baselines.py's too): a non-negative, finite map on the
    patch grid per target, some mass in each, each image's maps as when it is explained alone (to `atol` of
    the largest value), and no gradient or hook left on the model."""
    pictures = images(3)
    maps = explain(adapter, name, pictures, targets_of(BATCH_INDEX, LABELS))
    assert maps.shape == (4, 4, 4) and maps.dtype == torch.float32
    assert bool(torch.isfinite(maps).all()) and bool((maps >= 0).all()) and bool((maps.flatten(1).amax(1) > 0).all())
    for image in range(3):
        members = [k for k, b in enumerate(BATCH_INDEX) if b == image]
        alone = explain(adapter, name, [pictures[image]], targets_of([0] * len(members), [LABELS[k] for k in members]))
        torch.testing.assert_close(alone, maps[members], rtol=1e-4, atol=atol * float(maps.max()))
    assert all(p.grad is None for p in adapter.model.parameters()) and hooks(adapter) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_maps_are_non_negative_finite_on_the_grid_and_batched_equals_per_image(
        adapters: dict[str, ViTAdapter], kind: str, name: str) -> None:
    check_map_contract(adapters[kind], name, atol=1e-6)


@pytest.mark.parametrize("name", ["legrad", "cdam", "cdam-smooth", "cdam-integrated"])
def test_gradient_explainers_leave_no_hook_after_an_error(adapters: dict[str, ViTAdapter], name: str) -> None:
    adapter = adapters["timm"]
    with pytest.raises((IndexError, RuntimeError)):
        explain(adapter, name, images(2), targets_of([0, 1], [0, 7]))  # no label 7
    assert hooks(adapter) == 0 and all(p.grad is None for p in adapter.model.parameters())


def test_no_targets_give_no_maps(adapters: dict[str, ViTAdapter]) -> None:
    for name in EXPLAINERS:
        assert explain(adapters["vit"], name, images(2), targets_of([], [])).shape == (0, 4, 4)


def test_legrad_equals_legrad_torch_on_an_open_clip_vit(adapters: dict[str, ViTAdapter],
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """legrad-torch explains the similarity of the image embedding to a text embedding, summed over the blocks
    from `layer_index` (0: all, as ours), upsampled bilinearly by the patch size and min-maxed per map; our
    target, logit_scale * that cosine for the class embedding, differs by a positive factor that the min-max
    removes. So our map, upsampled and min-maxed the same way, is theirs."""
    import open_clip
    from legrad import LeWrapper

    adapter, pictures = adapters["open_clip"], images(3)
    ours = explain(adapter, "legrad", pictures, targets_of(BATCH_INDEX, LABELS))
    path = write_tiny_models(tmp_path_factory.mktemp("legrad_torch"), ("open_clip",))["open_clip"]
    wrapper = LeWrapper(open_clip.create_model(f"local-dir:{path}").eval(), layer_index=0)  # patches its model
    pixels = adapter.preprocess(pictures).pixel_values
    for k, (image, label) in enumerate(zip(BATCH_INDEX, LABELS)):
        theirs = wrapper.compute_legrad(adapter.model.class_embeddings[label][None], pixels[image][None])[0, 0]
        up = F.interpolate(ours[k][None, None], scale_factor=8, mode="bilinear")[0, 0]
        torch.testing.assert_close((up - up.min()) / (up.max() - up.min()), theirs.detach(), rtol=0, atol=1e-4)


def per_token_gradients(adapter: ViTAdapter, pixels: torch.Tensor, label: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow reference: T [N, D] entering the last attention of one image, and G [N, D] with G_i the
    gradient of the class logit with respect to token i alone, all tokens scaled by `scale`, one backward per
    token (token i made its own leaf, put in place of the first LayerNorm's output by a forward hook)."""
    last = adapter.num_blocks - 1
    norm = adapter.attention_norm(last)
    with torch.no_grad():
        x = adapter.tokens_entering(pixels[None], last)
        tokens = norm(x)[0]
    grads = []
    for i in range(tokens.shape[0]):
        leaf = (scale * tokens[i]).clone().requires_grad_(True)
        scaled = torch.cat([scale * tokens[:i], leaf[None], scale * tokens[i + 1:]])[None]
        handle = norm.register_forward_hook(lambda *_: scaled)
        try:
            out, _ = adapter.run_block(last, x)
        finally:
            handle.remove()
        grads.append(torch.autograd.grad(adapter.head(out)[0, label], leaf)[0])
    return tokens, torch.stack(grads)


def reference(adapter: ViTAdapter, pictures: list[torch.Tensor], targets: list[tuple[int, int]],
              scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, label) target, the slow token-by-token CDAM on the grid, kept positive as the maps are:
    the CDAM of each scaled copy, sum_d a T_id G_id(a), and integrated gradients, sum_d T_id G_id(a), each
    averaged over the scales a."""
    pixels = adapter.preprocess(pictures).pixel_values
    cdams, integrated = [], []
    for image, label in targets:
        per_scale = [(a, *per_token_gradients(adapter, pixels[image], label, a)) for a in scales]
        cdams.append(torch.stack([(a * tokens * grads).sum(-1) for a, tokens, grads in per_scale]).mean(0))
        integrated.append(torch.stack([(tokens * grads).sum(-1) for _, tokens, grads in per_scale]).mean(0))
    return tuple(torch.stack(maps)[:, adapter.n_prefix:].clamp(min=0).view(-1, *adapter.grid)  # type: ignore[return-value]
                 for maps in (cdams, integrated))


@pytest.mark.parametrize("kind", KINDS)
def test_cdam_equals_a_slow_per_token_reference(adapters: dict[str, ViTAdapter], kind: str) -> None:
    adapter, pictures = adapters[kind], images(3)
    ours = explain(adapter, "cdam", pictures, targets_of(BATCH_INDEX, LABELS))
    slow, _ = reference(adapter, pictures, list(zip(BATCH_INDEX, LABELS)), [1.0])
    torch.testing.assert_close(ours, slow, rtol=1e-4, atol=1e-6)


def test_smooth_cdam_at_zero_noise_is_cdam_and_its_noise_is_seeded(adapters: dict[str, ViTAdapter]) -> None:
    adapter, pictures, targets = adapters["vit"], images(3), targets_of(BATCH_INDEX, LABELS)
    vanilla = explain(adapter, "cdam", pictures, targets)
    with torch.inference_mode():
        batch = adapter.preprocess(pictures)
        outputs = adapter.forward(batch)

        def smooth(**settings: object) -> torch.Tensor:
            return get_explainer("cdam-smooth", CdamSmoothSettings(**settings)).explain(adapter, batch, outputs, targets)

        torch.testing.assert_close(smooth(n_samples=5, noise=0.0, batch_size=3), vanilla, rtol=1e-5, atol=1e-7)
        noisy = smooth(n_samples=6, noise=0.2, batch_size=4)
        torch.testing.assert_close(smooth(n_samples=6, noise=0.2, batch_size=64), noisy, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(noisy, vanilla)


@pytest.mark.parametrize("kind", ["vit", "open_clip"])
def test_integrated_cdam_reduces_to_the_half_scaled_tokens_in_one_step(adapters: dict[str, ViTAdapter], kind: str) -> None:
    """steps = 2 leaves the one scale 1/2: S = T . grad f(T / 2) = 2 x (T / 2) . grad f(T / 2), twice the vanilla
    CDAM of the halved tokens. steps = 3: T times the mean gradient at T / 3 and 2T / 3."""
    adapter, pictures = adapters[kind], images(2)
    pairs = [(0, 2), (1, 1)]
    targets = targets_of(*map(list, zip(*pairs)))
    with torch.inference_mode():
        batch = adapter.preprocess(pictures)
        outputs = adapter.forward(batch)

        def integrated(steps: int) -> torch.Tensor:
            settings = CdamIntegratedSettings(steps=steps, batch_size=3)
            return get_explainer("cdam-integrated", settings).explain(adapter, batch, outputs, targets)

        one_step, two_steps = integrated(2), integrated(3)
    halved, integrated_half = reference(adapter, pictures, pairs, [0.5])
    torch.testing.assert_close(one_step, 2 * halved, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one_step, integrated_half, rtol=1e-4, atol=1e-6)
    _, integrated_thirds = reference(adapter, pictures, pairs, [1 / 3, 2 / 3])
    torch.testing.assert_close(two_steps, integrated_thirds, rtol=1e-4, atol=1e-6)


def test_raw_attention_and_rollout_read_the_cls_row(adapters: dict[str, ViTAdapter]) -> None:
    """By hand on the forward's attention: raw = the last block's head-mean CLS row over the patches;
    rollout = the CLS row of prod_l rownorm(mean_h A_l + I) (timm: the registers are dropped, not read)."""
    adapter, pictures = adapters["timm"], images(2)
    targets = targets_of([0, 1], [0, 0])
    with torch.inference_mode():
        outputs = adapter.forward(adapter.preprocess(pictures))
    p = adapter.n_prefix
    raw = outputs.attentions[-1].mean(1)[:, 0, p:].reshape(2, 4, 4)
    torch.testing.assert_close(explain(adapter, "raw-attention", pictures, targets), raw)
    product = torch.eye(outputs.attentions[0].shape[-1])
    for attention in outputs.attentions:
        mixed = attention.mean(1) + torch.eye(attention.shape[-1])
        product = (mixed / mixed.sum(-1, keepdim=True)) @ product
    torch.testing.assert_close(explain(adapter, "rollout", pictures, targets), product[:, 0, p:].reshape(2, 4, 4))


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_explainers_run_under_the_cuda_autocast_of_the_adapter(adapters: dict[str, ViTAdapter], kind: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the adapter runs in bfloat16 autocast; the CPU's bfloat16 autocast stands in for it here: the
    recorded tokens are bfloat16 and the primitives an explainer calls on them must accept them."""
    adapter = adapters[kind]
    monkeypatch.setattr(adapter, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for name in EXPLAINERS:
        maps = explain(adapter, name, images(2), targets_of([0, 1], [1, 2]))
        assert maps.dtype == torch.float32 and bool(torch.isfinite(maps).all()) and bool((maps >= 0).all())
