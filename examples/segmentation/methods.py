"""The pipeline's distillation methods: every library preset, by its registry name.

A method is a name in :data:`segdistill.presets.PRESETS`; :data:`OPTIONS`, the one
table, says how a run fills that preset's arguments (its layers, the translator, the
config's weights and temperatures, the grid rule the paper's baselines use).
:func:`distillation_wrapper` looks the method up in both; there is no per-method branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examples.segmentation.data import IGNORE_INDEX
from examples.segmentation.run import (
    Run,
    build_student,
    build_teacher,
    load_weights,
    new_translator,
    student_feature,
    teacher_feature,
)
from segdistill import DistillationWrapper, Translator, presets

__all__ = [
    "COMBINATIONS",
    "METHODS",
    "OPTIONS",
    "TRANSLATOR_METHODS",
    "check_method",
    "distillation_wrapper",
    "method_options",
    "needs_translator",
    "parts",
    "trained_translator",
]

MethodOptions = Callable[[Run], dict[str, Any]]
"""The keyword arguments a run gives its method's preset (besides teacher and student)."""


def trained_translator(run: Run) -> Translator:
    """The translator of the translator stage, on the run's device."""
    translator = load_weights(new_translator(run), run.out / "translator" / "model.pt",
                              "trained translator")
    return translator.to(run.device)


def _layers(run: Run) -> dict[str, Any]:
    return {"teacher_layer": teacher_feature(run), "student_layer": student_feature(run)}


OPTIONS: dict[str, MethodOptions] = {
    # the student's map pooled onto the translator code's grid where they differ (an OS-8
    # student beside the code of an OS-8 teacher, at OS 16); the paper's pairs match
    "knowledge_adaptation": lambda run: {
        **_layers(run), "translator": trained_translator(run),
        "adaptation_weight": run.config.adaptation_weight,
        "affinity_weight": run.config.affinity_weight, "resize": "teacher"},
    "kd": lambda run: {"temperature": run.config.kd_temperature, "ignore_index": IGNORE_INDEX},
    # the student's map upsampled onto the teacher's grid, as in the paper's baselines
    "fitnet": lambda run: {**_layers(run), "resize": "teacher"},
    "attention_transfer": lambda run: {**_layers(run), "resize": "teacher"},
    # the teacher's map pooled onto the student's (smaller) grid: N x N stays small
    "pairwise": lambda run: {**_layers(run), "resize": "student"},
    "cwd": lambda run: {},
    # the mini-batch and memory terms on the teacher's grid; labels and pixel KD as CIRKD
    "cirkd": lambda run: {**_layers(run), "num_classes": run.config.num_classes,
                          "ignore_index": IGNORE_INDEX, "resize": "teacher",
                          "memory_pixel_weight": run.config.cirkd_memory_weight,
                          "memory_region_weight": run.config.cirkd_memory_weight},
    "dist": lambda run: {},
    # the teacher's map onto the student's grid: the prototypes are per image
    "ifvd": lambda run: {**_layers(run), "num_classes": run.config.num_classes,
                         "ignore_index": IGNORE_INDEX, "resize": "student"},
    # the student's map upsampled onto the teacher's grid before it is masked
    "mgd": lambda run: {**_layers(run), "resize": "teacher"},
    # logits upsampled to the discriminator's 64 x 64 where they are smaller (the digit
    # scenes' 48 x 48); no effect at VOC's and Cityscapes' sizes
    "holistic": lambda run: {"num_classes": run.config.num_classes, "min_size": 64},
}
"""Each method's preset options, by the preset's registry name."""

METHODS: tuple[str, ...] = tuple(OPTIONS)
"""The names ``--method`` takes: the registry's; and any of them joined by ``+`` (see
:func:`parts`)."""

TRANSLATOR_METHODS = frozenset({"knowledge_adaptation"})
"""The methods that need the translator stage first."""

COMBINATIONS: dict[str, str] = {
    "cirkd+holistic": "CIRKD's train_cirkd.sh: pixel KD, the mini-batch and memory terms, "
                      "and the adversarial term",
    "ifvd+kd+holistic": "CIRKD's baseline script for IFVD: pixel KD and the adversarial term "
                        "beside it",
    "cwd+holistic": "CWD with CIRKD's adversarial term",
}
"""Combinations CIRKD's scripts run, as ``--method`` takes them (any ``a+b`` works)."""


def parts(method: str) -> list[str]:
    """The presets of a method: ``'ifvd+kd+holistic'`` is three, combined into one
    wrapper (:func:`segdistill.presets.combine`)."""
    return method.split("+")


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is a pipeline method or a ``+``-joined
    combination of distinct ones (the message lists them)."""
    names = parts(method)
    unknown = [name for name in names if name not in OPTIONS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, or several distinct "
                         f"ones joined by '+' (e.g. cirkd+holistic), got {method!r}")


def needs_translator(method: str) -> bool:
    """Whether a method (or a part of a combination) needs the translator stage first."""
    return any(name in TRANSLATOR_METHODS for name in parts(method))


def method_options(run: Run, method: str) -> dict[str, Any]:
    """The preset options ``method`` (one preset) takes in ``run``.

    Raises:
        ValueError: ``method`` is not a pipeline method.
    """
    if method not in OPTIONS:
        check_method(method)
        raise ValueError(f"method_options takes one preset, got the combination {method!r}")
    return OPTIONS[method](run)


def distillation_wrapper(run: Run, method: str) -> DistillationWrapper:
    """The wrapper of one method around the trained teacher and a fresh student.

    Raises:
        ValueError: ``method`` is not a pipeline method.
    """
    check_method(method)
    teacher = build_teacher(run, trained=True)
    student = build_student(run)
    # after both networks (each seeded): the translator's and the adapters' initialisation
    # draw from the generator in this order, so a seed gives the same run as before
    wrappers = [presets.get_preset(name)(teacher, student, **method_options(run, name))
                for name in parts(method)]
    return wrappers[0] if len(wrappers) == 1 else presets.combine(*wrappers)
