"""CIRKD's benchmark (Yang et al., CVPR 2022; github winycg/CIRKD) as pipeline recipes.

A :class:`Recipe` is one published setup: its dataset, the config fields that set its
teacher, student and training (``overrides`` of the dataset's defaults), the val mIoU it
published for the teacher, the student and each distillation method (the targets), and
where the pipeline's run cannot yet be the published one (``deviations``). ``--recipe
NAME`` selects one (:func:`examples.segmentation.config.from_flags`); any flag given
beside it still overrides its fields.

The published numbers: CIRKD's README (teachers, baselines, SKD, IFVD, CWD, DSD, CIRKD, and
the VOC table), DIST_KD's (DIST 77.10), MasKD's (77.00) and Af-DCD's (77.03) papers, all on
CIRKD's code (single-scale val mIoU). This module holds data only and imports nothing of
the pipeline, so that :mod:`~examples.segmentation.config` can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RECIPES", "ROOTS", "Recipe", "Result", "command", "commands_table"]


@dataclass(frozen=True)
class Result:
    """One published val mIoU of a distilled student.

    Args:
        method: the method as the publication names it (``'CIRKD'``, ``'SKD'``).
        miou: its val mIoU, in percent.
        pipeline_method: the ``--method`` that runs it, or ``None`` where the pipeline has
            no such method.
        source: where the number is published.
        note: how the pipeline's method differs from the published run, if it does.
    """

    method: str
    miou: float
    pipeline_method: str | None
    source: str = "CIRKD README"
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    """A published setup: what to train, how, and the numbers to reach.

    Args:
        name: the ``--recipe`` name.
        dataset: the dataset (a key of :data:`examples.segmentation.config.CONFIGS`).
        teacher_net: the teacher, as its publication names it.
        student_net: the student, likewise.
        teacher_miou: the teacher's published val mIoU.
        student_miou: the student's (the baseline, trained without a teacher).
        distilled: each distillation method's result.
        overrides: the config fields this recipe sets on the dataset's defaults.
        published: the published training, in words.
        deviations: where the pipeline's run differs from the published one.
        blocked: why the pipeline cannot run this recipe yet (``None``: it can).
    """

    name: str
    dataset: str
    teacher_net: str
    student_net: str
    teacher_miou: float
    student_miou: float
    distilled: tuple[Result, ...]
    overrides: Mapping[str, Any]
    published: str
    deviations: tuple[str, ...] = ()
    blocked: str | None = None
    targets: Mapping[str, float] = field(init=False, repr=False, compare=False)
    """The published val mIoU by pipeline stage: ``'teacher'``, ``'student'`` and
    ``'distill-<method>'`` for each result the pipeline has a method for."""

    def __post_init__(self) -> None:
        targets = {"teacher": self.teacher_miou, "student": self.student_miou}
        targets.update({f"distill-{r.pipeline_method}": r.miou for r in self.distilled
                        if r.pipeline_method is not None})
        object.__setattr__(self, "targets", MappingProxyType(targets))


# CIRKD's SGD recipe for its CNNs (train_baseline.py, train_cirkd.py, train_kd.py): batch 16
# over 8 GPUs, 40k iterations, lr 0.02, poly 0.9, momentum 0.9, weight decay 1e-4 on every
# parameter, random scale 0.5 to 2.0, flip; the same for the teacher and the students
_CNN = {
    "batch_size": 16, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4,
    "teacher_weight_decay": 1e-4, "decay_norm_bias": True, "poly_power": 0.9,
    "scale_range": (0.5, 2.0), "teacher_steps": 40_000, "student_steps": 40_000,
    "distill_steps": 40_000,
}
# CIRKD's crops: 512 x 1024 (height x width) on Cityscapes, 512 x 512 on VOC
_CITYSCAPES_CNN = {**_CNN, "crop": (512, 1024), "train_split": "train", "val_split": "val"}
_VOC_CNN = {**_CNN, "crop": 512, "train_split": "train_aug", "val_split": "val"}

_CNN_DEVIATIONS = (
    "CIRKD trains its ResNet networks (teacher and ResNet-18 students) with an auxiliary "
    "FCN head on layer3 (loss weight 0.4); the pipeline has no auxiliary loss",
    "CIRKD's ResNets have a deep stem (three 3x3 convolutions) and its own ImageNet "
    "weights; the pipeline's take torchvision's 7x7 stem and ImageNet weights",
    "CIRKD subtracts the Caffe BGR mean without dividing by a std; the pipeline normalises "
    "with torchvision's ImageNet mean and std",
    "the discriminator's Adam runs at a constant 4e-4 (CIRKD's scripts decay it with the "
    "poly schedule)",
)

_SKD = "SKD as CIRKD runs it: the pair-wise term, pixel KD and the adversarial term"
_WITH_KD_ADV = "with pixel KD and the adversarial term, as CIRKD's baseline scripts"
_CWD = "CIRKD's CWD script weights logits 3 and features 50 (tau 4); --method cwd is the " \
       "logit term alone"


def _cityscapes_deeplab(name: str, student: str, student_net: str, baseline: float,
                        results: tuple[Result, ...]) -> Recipe:
    return Recipe(
        name=name, dataset="cityscapes", teacher_net="DeepLabV3-ResNet101",
        student_net=student_net, teacher_miou=78.07, student_miou=baseline,
        distilled=results,
        overrides={**_CITYSCAPES_CNN, "teacher": "deeplabv3_resnet101", "student": student},
        published="8 GPUs, batch 16, 512 x 1024 crops, 40k iterations, SGD lr 0.02 (poly "
                  "0.9), momentum 0.9, weight decay 1e-4; Cityscapes train (2,975), "
                  "evaluated on val (500) at 1024 x 2048, single scale",
        deviations=_CNN_DEVIATIONS)


def _voc(name: str, student: str, student_net: str, baseline: float, cirkd: float) -> Recipe:
    return Recipe(
        name=name, dataset="voc", teacher_net="DeepLabV3-ResNet101", student_net=student_net,
        teacher_miou=77.67, student_miou=baseline,
        distilled=(Result("CIRKD", cirkd, "cirkd+holistic"),),
        overrides={**_VOC_CNN, "teacher": "deeplabv3_resnet101", "student": student,
                   "cirkd_memory_weight": 0.01},
        published="8 GPUs, batch 16, 512 x 512 crops, 40k iterations, SGD lr 0.02 (poly "
                  "0.9), momentum 0.9, weight decay 1e-4; VOC trainaug (10,582), evaluated "
                  "on val (1,449), single scale; memory terms weighted 0.01",
        deviations=_CNN_DEVIATIONS)


_RECIPES = (
    _cityscapes_deeplab("cirkd-cityscapes-r101-r18", "deeplabv3_resnet18", "DeepLabV3-ResNet18",
                        74.21, (
        Result("SKD", 75.42, "pairwise+kd+holistic", note=_SKD),
        Result("IFVD", 75.59, "ifvd+kd+holistic", note=_WITH_KD_ADV),
        Result("CWD", 75.55, "cwd", note=_CWD),
        Result("DSD", 74.81, None, note="the pipeline has no DSD"),
        Result("CIRKD", 76.38, "cirkd+holistic"),
        Result("DIST", 77.10, "dist", source="DIST_KD (Huang et al., NeurIPS 2022)"),
        Result("MasKD", 77.00, None, source="MasKD (Huang et al., ICLR 2023)",
               note="the pipeline has no MasKD"),
        Result("Af-DCD", 77.03, None, source="Af-DCD (Fan et al., NeurIPS 2023)",
               note="the pipeline has no Af-DCD"),
    )),
    _cityscapes_deeplab("cirkd-cityscapes-r101-mbv2", "deeplabv3_mobilenet_v2",
                        "DeepLabV3-MobileNetV2", 73.12, (
        Result("SKD", 73.82, "pairwise+kd+holistic", note=_SKD),
        Result("IFVD", 73.50, "ifvd+kd+holistic", note=_WITH_KD_ADV),
        Result("CWD", 74.66, "cwd", note=_CWD),
        Result("DSD", 74.11, None, note="the pipeline has no DSD"),
        Result("CIRKD", 75.42, "cirkd+holistic"),
    )),
    _cityscapes_deeplab("cirkd-cityscapes-r101-psp18", "pspnet_resnet18", "PSPNet-ResNet18",
                        72.55, (Result("CIRKD", 74.73, "cirkd+holistic"),)),
    Recipe(
        name="cirkd-cityscapes-b4-b0", dataset="cityscapes", teacher_net="SegFormer MiT-B4",
        student_net="SegFormer MiT-B0", teacher_miou=81.23, student_miou=75.58, distilled=(
            Result("SKD", 76.43, "pairwise+kd+holistic", note=_SKD),
            Result("IFVD", 76.30, "ifvd+kd+holistic", note=_WITH_KD_ADV),
            Result("CWD", 74.80, "cwd", note=_CWD),
            Result("DSD", 76.62, None, note="the pipeline has no DSD"),
            Result("CIRKD", 76.92, "cirkd+holistic"),
        ),
        overrides={"teacher": "segformer_mit_b4", "student": "segformer_mit_b0",
                   "batch_size": 8, "crop": 1024, "lr": 2e-4, "weight_decay": 1e-4,
                   "optimizer": "adamw",
                   "teacher_weight_decay": 1e-4, "decay_norm_bias": True, "poly_power": 0.9,
                   "scale_range": (0.5, 2.0), "teacher_steps": 160_000,
                   "student_steps": 160_000, "distill_steps": 160_000,
                   "train_split": "train", "val_split": "val"},
        published="8 GPUs, batch 8, 1024 x 1024 crops, 160k iterations, AdamW lr 2e-4 (poly "
                  "0.9), weight decay 1e-4, MiT encoders from ImageNet; val evaluated as two "
                  "1024 x 1024 halves of each frame",
        deviations=("the pipeline evaluates whole 1024 x 2048 frames",)),
    _voc("cirkd-voc-r101-r18", "deeplabv3_resnet18", "DeepLabV3-ResNet18", 73.21, 74.50),
    _voc("cirkd-voc-r101-psp18", "pspnet_resnet18", "PSPNet-ResNet18", 73.33, 74.78),
)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})
"""The recipes by ``--recipe`` name."""


ROOTS = {"cityscapes": "/data/cityscapes", "voc": "/data/voc"}
"""The data folders the commands of :func:`commands_table` name."""


def command(recipe: Recipe, stage: str, method: str | None = None, gpus: int = 8) -> str:
    """The torchrun command that trains one row of ``recipe`` into ``runs/<recipe>``.

    Example:
        >>> words = command(RECIPES["cirkd-voc-r101-r18"], "distill", "cirkd", gpus=4).split()
        >>> for start in range(0, len(words), 6):
        ...     print(" ".join(words[start:start + 6]))
        torchrun --nproc_per_node 4 -m examples.segmentation distill
        --dataset voc --root /data/voc --recipe cirkd-voc-r101-r18
        --out runs/cirkd-voc-r101-r18 --method cirkd
    """
    words = ["torchrun", "--nproc_per_node", str(gpus), "-m", "examples.segmentation", stage,
             "--dataset", recipe.dataset, "--root", ROOTS[recipe.dataset], "--recipe",
             recipe.name, "--out", f"runs/{recipe.name}"]
    return " ".join(words + (["--method", method] if method else []))


def commands_table(gpus: int = 8) -> str:
    """A Markdown table: every published row of every recipe, its val mIoU, its source,
    and the command that trains it (examples/README.md holds this table)."""
    lines = ["| recipe | row | published val mIoU | source | command |",
             "|---|---|---:|---|---|"]
    for recipe in RECIPES.values():
        rows: list[tuple[str, float, str, str | None, str | None, str]] = [
            (f"teacher {recipe.teacher_net}", recipe.teacher_miou, "CIRKD README", "teacher",
             None, ""),
            (f"student {recipe.student_net}", recipe.student_miou, "CIRKD README", "student",
             None, "")]
        rows += [(r.method, r.miou, r.source, "distill" if r.pipeline_method else None,
                  r.pipeline_method, r.note) for r in recipe.distilled]
        for index, (row, miou, source, stage, method, note) in enumerate(rows):
            if recipe.blocked is not None:
                cell = f"not yet: {recipe.blocked}"
            elif stage is None:
                cell = f"none: {note}"
            else:
                cell = f"`{command(recipe, stage, method, gpus)}`" + (f" ({note})" if note
                                                                      else "")
            name = f"`{recipe.name}`" if index == 0 else ""
            lines.append(f"| {name} | {row} | {miou:.2f} | {source} | {cell} |")
    return "\n".join(lines)
