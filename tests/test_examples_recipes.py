"""CIRKD's published setups as recipes: each parses into a configuration of the networks
and training CIRKD publishes, names the published numbers (DESIGN section 4, CIRKD's
README), and is one flag on the command line; examples/README.md holds their commands."""

from __future__ import annotations

import doctest
import sys
import types
from dataclasses import fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import torch

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # for `examples`

from examples.segmentation import config as configs  # noqa: E402
from examples.segmentation import models, recipes  # noqa: E402
from examples.segmentation.cli import parser  # noqa: E402
from examples.segmentation.recipes import RECIPES  # noqa: E402

PUBLISHED = {
    # val mIoU: teacher, student, then each method as its publication names it
    "cirkd-cityscapes-r101-r18": (78.07, 74.21, {
        "SKD": 75.42, "IFVD": 75.59, "CWD": 75.55, "DSD": 74.81, "CIRKD": 76.38,
        "DIST": 77.10, "MasKD": 77.00, "Af-DCD": 77.03}),
    "cirkd-cityscapes-r101-mbv2": (78.07, 73.12, {
        "SKD": 73.82, "IFVD": 73.50, "CWD": 74.66, "DSD": 74.11, "CIRKD": 75.42}),
    "cirkd-cityscapes-r101-psp18": (78.07, 72.55, {"CIRKD": 74.73}),
    "cirkd-cityscapes-b4-b0": (81.23, 75.58, {
        "SKD": 76.43, "IFVD": 76.30, "CWD": 74.80, "DSD": 76.62, "CIRKD": 76.92}),
    "cirkd-voc-r101-r18": (77.67, 73.21, {"CIRKD": 74.50}),
    "cirkd-voc-r101-psp18": (77.67, 73.33, {"CIRKD": 74.78}),
}
"""Written out from DESIGN.md section 4 and CIRKD's README, apart from the module."""


def test_every_recipe_names_the_published_numbers():
    assert set(RECIPES) == set(PUBLISHED)
    for name, (teacher, student, methods) in PUBLISHED.items():
        recipe = RECIPES[name]
        assert (recipe.teacher_miou, recipe.student_miou) == (teacher, student), name
        assert {r.method: r.miou for r in recipe.distilled} == methods, name


def test_targets_are_by_pipeline_stage_for_the_methods_the_pipeline_has():
    from examples.segmentation.methods import check_method

    recipe = RECIPES["cirkd-cityscapes-r101-r18"]
    # CIRKD's scripts: its own terms with the adversarial one; the KD baselines with pixel KD
    # and the adversarial term beside them
    assert dict(recipe.targets) == {"teacher": 78.07, "student": 74.21,
                                    "distill-pairwise+kd+holistic": 75.42,
                                    "distill-ifvd+kd+holistic": 75.59,
                                    "distill-cwd": 75.55, "distill-cirkd+holistic": 76.38,
                                    "distill-dist": 77.10}
    assert configs.recipe_config("cirkd-voc-r101-r18").cirkd_memory_weight == 0.01
    for recipe in RECIPES.values():
        for result in recipe.distilled:
            if result.pipeline_method is not None:
                check_method(result.pipeline_method)
            assert result.pipeline_method is not None or result.note  # says why not


def _fits(value: object, kind: object) -> bool:
    """Whether ``value`` is of the annotation ``kind`` (the ones PipelineConfig uses)."""
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    if get_origin(kind) in (types.UnionType,):
        return any(_fits(value, k) for k in get_args(kind))
    if get_origin(kind) is tuple:
        return isinstance(value, tuple) and all(
            _fits(v, k) for v, k in zip(value, get_args(kind), strict=True))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_configuration_of_known_networks(name):
    recipe = RECIPES[name]
    config = configs.recipe_config(name)
    hints = get_type_hints(configs.PipelineConfig)
    assert set(recipe.overrides) <= {f.name for f in fields(configs.PipelineConfig)}
    for field, value in recipe.overrides.items():
        assert getattr(config, field) == value, field
        assert _fits(value, hints[field]), (field, value)
    assert config.dataset == recipe.dataset
    assert config.num_classes == configs.CONFIGS[recipe.dataset].num_classes
    assert config.teacher in models.TEACHERS and config.student in models.STUDENTS


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"cirkd-cityscapes-b4-b0"}))
def test_the_cnn_recipes_are_cirkds_sgd_training(name):
    config = configs.recipe_config(name)
    # CIRKD's train_baseline.py / train_cirkd.py: batch 16, 40k iterations, lr 0.02 (poly
    # 0.9), momentum 0.9, weight decay 1e-4 on everything, scale 0.5 to 2
    assert (config.batch_size, config.lr, config.poly_power, config.momentum) == \
        (16, 0.02, 0.9, 0.9)
    assert (config.weight_decay, config.teacher_weight_decay, config.decay_norm_bias) == \
        (1e-4, 1e-4, True)
    assert (config.teacher_steps, config.student_steps, config.distill_steps) == \
        (40_000, 40_000, 40_000)
    assert config.scale_range == (0.5, 2.0) and config.teacher == "deeplabv3_resnet101"
    if config.dataset == "cityscapes":  # CIRKD's 512 x 1024 (height x width)
        assert (config.crop, config.train_split) == ((512, 1024), "train")
    else:
        assert (config.crop, config.train_split) == (512, "train_aug")
    assert RECIPES[name].blocked is None and RECIPES[name].deviations
    assert not any("crop" in d for d in RECIPES[name].deviations)  # the published crop


def test_the_segformer_recipe_is_cirkds_with_adamw():
    from examples.segmentation.training import TrainConfig, make_optimizer

    recipe = RECIPES["cirkd-cityscapes-b4-b0"]
    config = configs.recipe_config(recipe.name)
    assert (config.teacher, config.student) == ("segformer_mit_b4", "segformer_mit_b0")
    assert (config.batch_size, config.crop, config.lr, config.distill_steps) == \
        (8, 1024, 2e-4, 160_000)
    assert config.optimizer == "adamw" and recipe.blocked is None
    args = parser().parse_args(["teacher", "--dataset", "cityscapes", "--recipe", recipe.name])
    assert configs.from_flags(args, "cityscapes").optimizer == "adamw"
    net = torch.nn.Linear(3, 2)
    optimizer, _, _ = make_optimizer(net, TrainConfig(steps=2, lr=2e-4, weight_decay=1e-4,
                                                      optimizer="adamw"), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 2e-4
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        TrainConfig(steps=2, optimizer="adam")


def test_the_recipe_flag_sets_the_defaults_that_other_flags_override():
    argv = ["distill", "--dataset", "cityscapes", "--recipe", "cirkd-cityscapes-r101-mbv2",
            "--method", "cirkd", "--distill-steps", "10", "--amp", "bf16"]
    config = configs.from_flags(parser().parse_args(argv), "cityscapes")
    assert config == configs.recipe_config("cirkd-cityscapes-r101-mbv2").override(
        distill_steps=10, amp="bf16")
    assert config.student == "deeplabv3_mobilenet_v2" and config.lr == 0.02
    assert config.crop == (512, 1024)  # the recipe's, and a flag overrides it
    square = configs.from_flags(parser().parse_args([*argv, "--crop", "769"]), "cityscapes")
    assert square.crop == 769 and square == config.override(crop=769)
    plain = configs.from_flags(parser().parse_args(["distill", "--dataset", "cityscapes"]),
                               "cityscapes")
    assert plain == configs.CONFIGS["cityscapes"]  # no recipe: the dataset's defaults
    wrong = parser().parse_args(["teacher", "--dataset", "voc", "--recipe",
                                 "cirkd-cityscapes-r101-r18"])
    with pytest.raises(ValueError, match=r"--recipe cirkd-cityscapes-r101-r18 is a cityscapes "
                                         r"recipe: give --dataset cityscapes, got --dataset voc"):
        configs.from_flags(wrong, "voc")
    with pytest.raises(ValueError, match=r"recipe must be one of cirkd-cityscapes-b4-b0, .*got "
                                         r"'cirkd'"):
        configs.recipe_config("cirkd")
    with pytest.raises(SystemExit):  # argparse lists the choices
        parser().parse_args(["teacher", "--dataset", "voc", "--recipe", "cirkd"])


def test_the_readme_holds_the_commands_table():
    readme = (ROOT / "examples" / "README.md").read_text()
    table = recipes.commands_table()
    assert table in readme
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == sum(2 + len(r.distilled) for r in RECIPES.values())
    for line in rows:  # every command the table gives parses into its recipe's config
        if "`torchrun" not in line:
            continue
        words = line.split("`torchrun")[1].split("`")[0].split()
        args = parser().parse_args(words[words.index("examples.segmentation") + 1:])
        assert configs.from_flags(args, args.dataset) == configs.recipe_config(args.recipe)


def test_a_recipe_trains_its_student_from_the_command_line(tmp_path):
    import json

    from test_examples import make_cityscapes

    from examples.segmentation.cli import main

    root, out = make_cityscapes(tmp_path / "data"), tmp_path / "runs"
    assert main(["student", "--dataset", "cityscapes", "--recipe", "cirkd-cityscapes-r101-psp18",
                 "--root", str(root), "--out", str(out), "--no-pretrained", "--crop", "32",
                 "--batch-size", "2", "--student-steps", "2", "--workers", "0",
                 "--log-every", "1", "--no-progress", "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (out / "student" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and log[0]["lr"] == 0.02  # the recipe's
    net = models.STUDENTS["pspnet_resnet18"].build(19, False)
    state = torch.load(out / "student" / "model.pt", weights_only=True)["model"]
    assert state.keys() == net.state_dict().keys()  # CIRKD's PSPNet-ResNet18, 19 classes


def test_recipes_and_config_doctests():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    tests = [*finder.find(recipes, "recipes", globs=vars(recipes)),
             *finder.find(configs.recipe_config, "recipe_config", globs=vars(configs)),
             *finder.find(configs.crop_size, "crop_size", globs=vars(configs))]
    assert sum(len(t.examples) for t in tests) >= 3
    for test in tests:
        runner.run(test, out=output.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(output)
