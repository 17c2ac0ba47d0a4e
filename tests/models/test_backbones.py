"""Backbone entries: each entry's stated facts are true of the module it builds (feature dim from a forward
pass, stage channels and strides from forward hooks, stem modules by name), and its layout recognition
round-trips for every architecture and stem; unknown names fail listing the known ones."""

from __future__ import annotations

import pytest
import torch
import torchvision

from simsiam_kit.config import load_pretrain_config
from simsiam_kit.errors import UserError
from simsiam_kit.models import BACKBONES, STEMS, build_backbone, get_backbone_entry, infer_arch, infer_stem

CASES = [(arch, stem) for arch, entry in BACKBONES.items() for stem in entry.stems]
SIDE = 64  # tiny input: every stage keeps at least 1x1 with either stem


@pytest.fixture(scope="module")
def built():
    """One module per (arch, stem), built once for the tests below."""
    torch.manual_seed(0)
    return {(a, s): build_backbone(a, s).eval() for a, s in CASES}


@pytest.mark.parametrize("arch, stem", CASES)
def test_entry_facts_hold_for_the_module_it_builds(built, arch, stem):
    entry, net = BACKBONES[arch], built[(arch, stem)]
    seen = {}
    modules = dict(net.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
        for name in entry.stage_names
    ]
    with torch.no_grad():
        out = net(torch.randn(2, 3, SIDE, SIDE))
    for h in hooks:
        h.remove()
    assert out.shape == (2, entry.feature_dim) and net.feature_dim == entry.feature_dim
    assert (net.arch, net.stem) == (arch, stem)
    # stage channels (what an FPN's in_channels_list needs) and strides, as the hooks saw them
    assert tuple(seen[n][1] for n in entry.stage_names) == entry.stage_channels
    s = entry.stem(stem)
    sides = [s.output_side(SIDE)]
    for _ in entry.stage_names[1:]:  # each later stage: a 3x3/2 conv, padding 1
        sides.append((sides[-1] - 1) // 2 + 1)
    assert tuple(seen[n][2] for n in entry.stage_names) == tuple(sides)
    if s.conv_padding == s.kernel // 2:  # "same" padding: the sides are SIDE / stride exactly
        assert tuple(SIDE // seen[n][2] for n in entry.stage_names) == entry.feature_strides(stem)
    assert all(name in modules for name in entry.stem_modules)
    conv1 = net.conv1
    assert conv1.kernel_size == (s.kernel, s.kernel) and conv1.stride == (s.stride, s.stride)
    assert conv1.padding == (s.conv_padding, s.conv_padding)


@pytest.mark.parametrize("arch, stem", CASES)
def test_layout_recognition_round_trip(built, arch, stem):
    sd = built[(arch, stem)].state_dict()
    # a stem that shapes cannot tell from another (solo-learn's padding-2 CIFAR stem) is never guessed
    want = stem if STEMS[stem].inferable else next(n for n, s in STEMS.items() if s.inferable and s.kernel == 3)
    assert infer_arch(sd) == arch and infer_stem(sd) == want and infer_stem(sd, arch) == want
    assert [name for name, e in BACKBONES.items() if e.matches(sd)] == [arch]  # exactly one entry


def test_expected_entries_and_facts_by_hand():
    assert list(BACKBONES) == ["resnet18", "resnet34", "resnet50", "resnet101"]
    r18, r50 = BACKBONES["resnet18"], BACKBONES["resnet50"]
    assert (r18.feature_dim, r18.stage_channels) == (512, (64, 128, 256, 512))
    assert (r50.feature_dim, r50.stage_channels) == (2048, (256, 512, 1024, 2048))
    assert r50.stage_names == ("layer1", "layer2", "layer3", "layer4") and r50.stem_modules == ("conv1", "bn1")
    assert r50.feature_strides("imagenet") == (4, 8, 16, 32) and r50.feature_strides("cifar") == (1, 2, 4, 8)
    assert {n: s.default_image_size for n, s in STEMS.items()} == {"cifar": 32, "imagenet": 224, "solo-cifar": 32}
    assert {n: s.conv_padding for n, s in STEMS.items()} == {"cifar": 1, "imagenet": 3, "solo-cifar": 2}
    # a 32 px image reaches the first stage at 32 px (cifar), 34 px (solo-learn: padding 2), 8 px (imagenet)
    assert [STEMS[n].output_side(32) for n in ("cifar", "solo-cifar", "imagenet")] == [32, 34, 8]
    assert [e.detectron2_depth for e in BACKBONES.values()] == [18, 34, 50, 101]


def test_imagenet_stem_is_torchvision_bit_for_bit():
    """The builder is torchvision's ResNet (same RNG use, same keys), only ``fc`` replaced."""
    torch.manual_seed(3)
    ours = build_backbone("resnet34", "imagenet").state_dict()
    torch.manual_seed(3)
    ref = torchvision.models.resnet34(weights=None, zero_init_residual=True).state_dict()
    ref = {k: v for k, v in ref.items() if not k.startswith("fc.")}
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_norm_layer_is_passed_to_every_norm():
    from torchvision.ops import FrozenBatchNorm2d

    net = build_backbone("resnet18", "imagenet", norm_layer=FrozenBatchNorm2d)
    norms = [m for m in net.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    assert len(norms) == 20 and all(isinstance(m, FrozenBatchNorm2d) for m in norms)


def test_unknown_names_fail_listing_the_known_ones():
    with pytest.raises(UserError, match=r"unknown backbone 'vit_b16' \(available: resnet18, resnet34, resnet50"):
        build_backbone("vit_b16")
    with pytest.raises(UserError, match=r"unknown backbone 'x'"):
        get_backbone_entry("x")
    with pytest.raises(UserError, match=r"unknown stem 'tiny' for resnet18 \(available: cifar, imagenet, solo-cifar\)"):
        build_backbone("resnet18", "tiny")


def test_unrecognised_layouts_are_described(built):
    sd = dict(built[("resnet50", "cifar")].state_dict())
    for k in [k for k in sd if k.startswith("layer3.5.")]:  # a ResNet-50 with a block missing
        del sd[k]
    with pytest.raises(UserError, match=r"blocks per stage \[3, 4, 5, 3\], bottleneck blocks.*none of resnet18"):
        infer_arch(sd)
    sd = dict(built[("resnet18", "cifar")].state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(UserError, match=r"conv1.weight is 5x5: no ResNet stem .*cifar: 3x3, imagenet: 7x7"):
        infer_stem(sd)
    with pytest.raises(UserError, match="no 'conv1.weight'"):
        infer_stem({})


def test_config_validation_asks_the_entries():
    with pytest.raises(
        UserError, match=r"'model.arch': 'vit' \(expected one of resnet18, resnet34, resnet50, resnet101"
    ):
        load_pretrain_config("demo", ["model.arch=vit"])
    with pytest.raises(UserError, match=r"'model.stem': 'patch16' \(expected cifar or imagenet or solo-cifar\)"):
        load_pretrain_config("demo", ["model.stem=patch16"])
    assert load_pretrain_config("demo", ["model.arch=resnet50", "model.stem=imagenet"]).model.arch == "resnet50"


def test_entries_load_without_torch():
    """Config validation and the CLI's checks ask the entries before torch is loaded."""
    import subprocess
    import sys

    code = (
        "import sys; from simsiam_kit.models import BACKBONES, STEMS; "
        "from simsiam_kit.config import load_pretrain_config; load_pretrain_config('demo', []); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
