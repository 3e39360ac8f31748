"""Per-dataset configurations, and a command-line flag for each of their fields.

VOC, Cityscapes and Pascal Context take the paper's hyperparameters (DESIGN section 1); the
digit scenes take a schedule that runs on a CPU in minutes. :func:`add_flags`
derives one flag per field of :class:`PipelineConfig` from its type, so a new
field is a new flag without further code, and adds ``--recipe``: one of CIRKD's published
setups (:data:`examples.segmentation.recipes.RECIPES`) in place of the dataset's defaults.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from numbers import Integral
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from examples.segmentation.recipes import RECIPES

Dataset = Literal["voc", "cityscapes", "pascal_context", "digits"]
Optimizer = Literal["sgd", "adamw"]

Amp = Literal["none", "bf16", "fp16"]
"""Automatic mixed precision: off, bfloat16, or float16 with a gradient scaler."""

Teacher = Literal["deeplabv3_resnet50", "deeplabv3_resnet101", "segformer_mit_b4", "digits_os4"]
"""The names of :data:`examples.segmentation.models.TEACHERS`."""
Student = Literal["mobilenet_v2", "lraspp", "deeplabv3_resnet18", "pspnet_resnet18",
                  "deeplabv3_mobilenet_v2", "segformer_mit_b0", "digits_os8"]
"""The names of :data:`examples.segmentation.models.STUDENTS`."""
TeacherLayer = Literal["head", "backbone"]
"""Readings of the paper's "last feature maps in the teacher model"
(:meth:`examples.segmentation.models.Architecture.layer`)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a pipeline run needs; a command-line flag overrides any field.

    The string under each field is its flag's help.
    """

    dataset: Dataset = "voc"
    """the dataset"""
    num_classes: int = 21
    """classes of the labels (the ignore label 255 aside)"""
    crop: int | tuple[int, int] = 513
    """the training crop: one int, a square's side, or two, its height and width (--crop 512
    1024); a pair of equal sides is kept as one int, so both forms record and resume alike;
    the digit scenes take one int, their side"""
    train_split: str = "train_aug"
    """the training split"""
    val_split: str = "val"
    """the evaluation split"""
    teacher: Teacher = "deeplabv3_resnet50"
    """the teacher network"""
    student: Student = "mobilenet_v2"
    """the student network"""
    teacher_layer: TeacherLayer = "head"
    """the teacher's feature map that the translator, the adapters and the feature
    baselines read: 'head', the last before the classifier (DeepLabV3: classifier.3, 256
    channels), or 'backbone', the backbone's last (backbone.layer4, 2048 channels);
    examples/README.md says why 'head'"""
    # the paper's recipe: SGD momentum 0.9, weight decay 4e-5, lr 0.007, poly 0.9, batch 16
    batch_size: int = 16
    """global batch, split over the processes"""
    lr: float = 0.007
    """base learning rate of the poly schedule"""
    momentum: float = 0.9
    """SGD momentum"""
    optimizer: Optimizer = "sgd"
    """the student's (and teacher's) optimiser: 'sgd' (with momentum) or 'adamw' (betas
    0.9, 0.999; as CIRKD trains SegFormer); both under the poly schedule"""
    weight_decay: float = 4e-5
    """SGD weight decay of the student and distillation stages (MobileNetV2's recipe, which
    the paper follows)"""
    teacher_weight_decay: float = 1e-4
    """SGD weight decay of the teacher stage (DeepLab's ResNet recipe)"""
    decay_norm_bias: bool = True
    """weight decay on normalisation parameters and biases too (--no-decay-norm-bias
    exempts them)"""
    accumulate: int = 1
    """batches whose gradients each step sums on each process (gradient accumulation):
    the global batch stays batch_size, each forward pass takes batch_size / (processes x
    accumulate)"""
    val_every: int | None = None
    """steps between validations on the val split during training, keeping best.pt, the
    weights of the best val mIoU (none: no validation)"""
    poly_power: float = 0.9
    """power of the poly schedule"""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """random scale range of the augmentation"""
    # iterations: the paper's (section 4.1): 30k on VOC trainaug and Pascal Context, 90k on
    # Cityscapes
    teacher_steps: int = 30_000
    """teacher training steps"""
    student_steps: int = 30_000
    """student baseline training steps"""
    distill_steps: int = 30_000
    """distillation steps"""
    translator_epochs: int = 1
    """translator epochs (stage 1)"""
    translator_steps: int | None = None
    """cap on the translator's steps (none: no cap)"""
    translator_channels: int | None = None
    """the translator's code channels (none: the teacher's, as in the paper)"""
    translator_lr: float = 0.1
    """translator learning rate (constant)"""
    translator_weight_decay: float = 1e-4
    """translator weight decay"""
    translator_timeout: float = 360.0
    """minutes the other processes wait for rank 0 to train the translator under torchrun"""
    adaptation_weight: float = 50.0
    """beta, the adaptation term's weight (--method knowledge_adaptation)"""
    affinity_weight: float = 1.0
    """gamma, the affinity term's weight (--method knowledge_adaptation)"""
    kd_temperature: float = 4.0
    """KD's temperature (--method kd)"""
    cirkd_memory_weight: float = 0.1
    """the weight of CIRKD's two memory terms (--method cirkd; CIRKD's VOC script: 0.01)"""
    pretrained: bool = True
    """ImageNet-pretrained backbones (torchvision's weights)"""
    amp: Amp = "none"
    """automatic mixed precision"""
    sync_bn: bool | None = None
    """synchronised batch norm across processes (none: on when more than one process runs
    on CUDA)"""
    workers: int = 4
    """data-loading worker processes"""
    threads: int | None = None
    """torch's threads per process (none: torch's default, one per core); on a machine
    whose cores other jobs share, 1 can be many times faster"""
    checkpoint_every: int = 1000
    """steps between checkpoints"""
    log_every: int = 20
    """steps between log lines"""
    seed: int = 0
    """seeds the initial weights, the data order and the augmentation"""
    eval_batch_size: int = 1
    """evaluation batch"""
    scenes: tuple[int, int] = (2000, 500)
    """digits only: the numbers of training and val scenes"""

    def __post_init__(self) -> None:
        # one form per crop (an int for a square, else a tuple of built-in ints), so that
        # configs compare equal and checkpoints record it as torch.load(weights_only) reads it
        height, width = crop_size(self.crop)
        object.__setattr__(self, "crop", height if height == width else (height, width))

    def override(self, **values: Any) -> PipelineConfig:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(names)}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def crop_size(crop: int | Sequence[int]) -> tuple[int, int]:
    """The (height, width) of a training crop given as one side (a square) or as a pair.

    Example:
        >>> crop_size(513), crop_size((512, 1024)), crop_size([769])
        ((513, 513), (512, 1024), (769, 769))

    Raises:
        TypeError: ``crop`` is not an int or a sequence of ints (bools are no sides).
        ValueError: it has no value or more than two, or a side below 1.
    """
    given: Sequence[object]
    if isinstance(crop, Integral):
        given = [crop]
    elif isinstance(crop, Sequence) and not isinstance(crop, (str, bytes)):
        given = crop
    else:
        raise TypeError(f"crop must be an int (a square's side) or a pair of ints (height, "
                        f"width), got {crop!r} ({type(crop).__name__})")
    if not 1 <= len(given) <= 2:
        raise ValueError(f"crop takes one int (a square's side) or two (height, width), got "
                         f"{len(given)} values: {crop!r}")
    sides = [int(s) for s in given if not isinstance(s, bool) and isinstance(s, Integral)]
    if len(sides) != len(given):
        raise TypeError(f"crop's sides must be ints, got {crop!r}")
    if min(sides) < 1:
        raise ValueError(f"crop's sides must be positive, got {crop!r}")
    return sides[0], sides[-1]


RESUME_SAFE = ("threads", "checkpoint_every", "log_every", "eval_batch_size", "val_every",
               "translator_timeout")
"""The fields whose flags a ``--resume`` may change: how the run is kept, shown and
validated, not what it trains (``--no-progress`` and ``--device`` are no fields, and free
too). A change of any other field (of the stage's) is refused, listing what changed;
``workers`` among them, as torchdata's saved loader position is per worker process."""

STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "teacher": ("translator", "distill", "teacher"),
    "teacher_weight_decay": ("teacher",),
    "teacher_steps": ("teacher",),
    "student": ("student", "distill"),
    "student_steps": ("student",),
    "weight_decay": ("student", "distill"),
    "distill_steps": ("distill",),
    "teacher_layer": ("translator", "distill"),
    "translator_channels": ("translator", "distill"),
    "adaptation_weight": ("distill",),
    "affinity_weight": ("distill",),
    "kd_temperature": ("distill",),
    "cirkd_memory_weight": ("distill",),
    "translator_epochs": ("translator",),
    "translator_steps": ("translator",),
    "translator_lr": ("translator",),
    "translator_weight_decay": ("translator",),
}
"""The fields that concern some stages only (``teacher``, ``student``, ``translator``,
``distill``), and which: a resume of another stage ignores them. Every other field but
:data:`RESUME_SAFE` concerns every stage."""

CONFIGS = {
    "voc": PipelineConfig(),
    "cityscapes": PipelineConfig(dataset="cityscapes", num_classes=19, crop=769,
                                 train_split="train", teacher_steps=90_000,
                                 student_steps=90_000, distill_steps=90_000,
                                 eval_batch_size=2),
    # the paper: 59 classes, 30k iterations on train, evaluated on val, VOC's crop (513)
    "pascal_context": PipelineConfig(dataset="pascal_context", num_classes=59, crop=513,
                                     train_split="train", val_split="val"),
    # The demo: 48 x 48 scenes, no pretraining, short schedules. The adaptation weight is
    # rescaled to these small networks (at the paper's 50 the term is some 200 times the
    # cross-entropy; docs/ablation.rst measures both).
    "digits": PipelineConfig(dataset="digits", num_classes=11, crop=48, train_split="train",
                             teacher="digits_os4", student="digits_os8", batch_size=32,
                             lr=0.05, teacher_weight_decay=4e-5, teacher_steps=1000,
                             student_steps=1000, distill_steps=1000, translator_epochs=5,
                             translator_steps=300, adaptation_weight=0.5, pretrained=False,
                             workers=0,
                             checkpoint_every=500, log_every=10, eval_batch_size=100),
}
"""The default configuration of each dataset."""


def _optional(kind: Any) -> Any:
    """For ``X | None``: X, else None."""
    if get_origin(kind) in (Union, types.UnionType):
        inner = [a for a in get_args(kind) if a is not type(None)]
        if len(inner) == 1 and len(get_args(kind)) == 2:
            return inner[0]
    return None


def _one_or_pair(kind: Any) -> Any:
    """For ``X | tuple[X, X]``: X, else None."""
    if get_origin(kind) not in (Union, types.UnionType) or len(get_args(kind)) != 2:
        return None
    one, pair = get_args(kind)
    if get_origin(one) is tuple:
        one, pair = pair, one
    return one if get_args(pair) == (one, one) else None


def field_help(cls: type) -> dict[str, str]:
    """The string literal under each field of the dataclass ``cls``, by field name (the
    attribute docstrings that Sphinx shows too)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node, after in itertools.pairwise(body.body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("dataset",)) -> None:
    """Add a flag for each field of :class:`PipelineConfig` (``--batch-size`` for
    ``batch_size``), typed from the field's annotation; every default is ``None``,
    meaning "the dataset's"."""
    group = parser.add_argument_group(
        "configuration (a flag per field of PipelineConfig; defaults: the dataset's)")
    group.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="a published setup (examples/segmentation/recipes.py: teacher, "
                       "student, crop, schedule, weight decay) in place of the dataset's "
                       "defaults; the flags below still override its fields, and --dataset "
                       "must be the recipe's")
    hints = get_type_hints(PipelineConfig)
    helps = field_help(PipelineConfig)
    for f in fields(PipelineConfig):
        if f.name in skip:
            continue
        kind = hints[f.name]
        defaults = {name: getattr(config, f.name) for name, config in CONFIGS.items()}
        shown = (f"default {defaults['voc']}" if len(set(defaults.values())) == 1
                 else ", ".join(f"{name} {value}" for name, value in defaults.items()))
        options: dict[str, Any] = {"dest": f.name, "default": None,
                                   "help": f"{helps[f.name]} ({shown})"}
        flag = "--" + f.name.replace("_", "-")
        inner = _optional(kind)
        if kind is bool or inner is bool:  # bool | None: not given means the default
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif get_origin(kind) is tuple:
            options.update(nargs=len(get_args(kind)), type=get_args(kind)[0])
        elif _one_or_pair(kind) is not None:  # one value or two: the config checks how many
            options.update(nargs="+", type=_one_or_pair(kind), metavar=("H", "W"))
        elif inner is not None:
            options["type"] = _none_or(inner)
            options["metavar"] = f"{inner.__name__.upper()}|none"
        else:
            options["type"] = kind
        group.add_argument(flag, **options)


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return _NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


_NONE = object()
"""Stands for an explicit ``none`` on the command line (``None`` means "not given")."""


def recipe_config(name: str) -> PipelineConfig:
    """The configuration of a recipe: its dataset's defaults with the recipe's fields.

    Example:
        >>> config = recipe_config("cirkd-cityscapes-r101-r18")
        >>> config.teacher, config.student, config.lr, config.distill_steps
        ('deeplabv3_resnet101', 'deeplabv3_resnet18', 0.02, 40000)

    Raises:
        ValueError: no recipe of that name (the message lists them).
    """
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(sorted(RECIPES))}, got {name!r}")
    recipe = RECIPES[name]
    return CONFIGS[recipe.dataset].override(**recipe.overrides)


def _defaults(dataset: str, recipe: str | None) -> PipelineConfig:
    """What the flags override: the dataset's defaults, or the recipe's."""
    if recipe is None:
        return CONFIGS[dataset]
    config = recipe_config(recipe)
    blocked = RECIPES[recipe].blocked
    if blocked is not None:
        raise ValueError(f"--recipe {recipe} cannot run yet: {blocked}")
    if config.dataset != dataset:
        raise ValueError(f"--recipe {recipe} is a {config.dataset} recipe: give --dataset "
                         f"{config.dataset}, got --dataset {dataset}")
    return config


def from_flags(args: argparse.Namespace, dataset: str) -> PipelineConfig:
    """The dataset's configuration (or ``--recipe``'s) with every flag given in ``args``
    applied.

    Raises:
        ValueError: ``--recipe`` names another dataset's recipe, or one that the pipeline
            cannot run yet (:attr:`~examples.segmentation.recipes.Recipe.blocked`).
    """
    values = {f.name: getattr(args, f.name, None) for f in fields(PipelineConfig)
              if f.name != "dataset"}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    config = _defaults(dataset, getattr(args, "recipe", None)).override(**values)
    nones: dict[str, Any] = {k: None for k, v in values.items() if v is _NONE}
    return replace(config, **nones) if nones else config
