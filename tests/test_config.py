import pytest

from simsiam_kit.config import PretrainConfig, load_pretrain_config
from simsiam_kit.errors import UserError


def test_shipped_configs_load_and_match_paper():
    cifar = load_pretrain_config("cifar10_resnet18")
    assert (cifar.model.stem, cifar.model.proj_layers, cifar.optim.base_lr, cifar.optim.weight_decay) == (
        "cifar",
        2,
        0.03,
        5e-4,
    )
    assert cifar.optim.batch_size == 512 and cifar.optim.epochs == 800 and cifar.data.blur_prob == 0.0
    inet = load_pretrain_config("imagenet_resnet50")
    assert (inet.model.arch, inet.model.proj_layers, inet.optim.base_lr, inet.optim.weight_decay) == (
        "resnet50",
        3,
        0.05,
        1e-4,
    )
    assert inet.optim.fix_pred_lr and inet.data.blur_prob == 0.5 and inet.data.image_size == 224
    assert load_pretrain_config("demo").name == "demo"


def test_overrides_apply_and_parse_types():
    cfg = load_pretrain_config(
        "demo", ["optim.epochs=3", "model.predictor=false", "optim.base_lr=0.1", "data.mean=[0.5,0.5,0.5]"]
    )
    assert cfg.optim.epochs == 3 and cfg.model.predictor is False and cfg.optim.base_lr == 0.1
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 5  # frozen


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  epocs: 3\n")
    with pytest.raises(UserError) as e:
        load_pretrain_config(str(p))
    assert "optim.epocs" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_and_bad_value(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  epochs: three\n")
    with pytest.raises(UserError, match="optim.epochs"):
        load_pretrain_config(str(p))
    with pytest.raises(UserError, match="model.stem"):
        load_pretrain_config("demo", ["model.stem=vit"])
    with pytest.raises(UserError, match="unknown config key 'optim.lr'"):
        load_pretrain_config("demo", ["optim.lr=0.1"])
    with pytest.raises(UserError, match="key=value"):
        load_pretrain_config("demo", ["optim.epochs"])
    with pytest.raises(UserError, match="unknown pretrain config 'nope'"):
        load_pretrain_config("nope")


def test_defaults_are_paper_values():
    c = PretrainConfig()
    assert c.model.proj_dim == 2048 and c.model.pred_hidden == 512 and c.optim.momentum == 0.9
    assert c.model.stop_gradient and c.model.predictor and c.loss.symmetric


def test_precision_names_checked_in_one_place():
    import torch

    from simsiam_kit.utils.device import resolve_precision

    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")).name == "fp32"
    with pytest.raises(UserError, match="train.precision"):
        load_pretrain_config("demo", ["train.precision=fp8"])


def test_hostile_set_values_are_one_line_errors():
    with pytest.raises(UserError, match="--set train.seed: the value is 5000 characters"):
        load_pretrain_config("demo", ["train.seed=" + "9" * 5000])
    with pytest.raises(UserError, match="--set model.arch"):
        load_pretrain_config("demo", ["model.arch=" + "[" * 3000])
