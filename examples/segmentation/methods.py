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
    "METHODS",
    "NOT_YET",
    "OPTIONS",
    "TRANSLATOR_METHODS",
    "check_method",
    "distillation_wrapper",
    "method_options",
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
    "knowledge_adaptation": lambda run: {
        **_layers(run), "translator": trained_translator(run),
        "adaptation_weight": run.config.adaptation_weight,
        "affinity_weight": run.config.affinity_weight},
    "kd": lambda run: {"temperature": run.config.kd_temperature, "ignore_index": IGNORE_INDEX},
    # the student's map upsampled onto the teacher's grid, as in the paper's baselines
    "fitnet": lambda run: {**_layers(run), "resize": "teacher"},
    "attention_transfer": lambda run: {**_layers(run), "resize": "teacher"},
    # the teacher's map pooled onto the student's (smaller) grid: N x N stays small
    "pairwise": lambda run: {**_layers(run), "resize": "student"},
    "cwd": lambda run: {},
    # the mini-batch and memory terms on the teacher's grid; labels and pixel KD as CIRKD
    "cirkd": lambda run: {**_layers(run), "num_classes": run.config.num_classes,
                          "ignore_index": IGNORE_INDEX, "resize": "teacher"},
    "dist": lambda run: {},
    # the teacher's map onto the student's grid: the prototypes are per image
    "ifvd": lambda run: {**_layers(run), "num_classes": run.config.num_classes,
                         "ignore_index": IGNORE_INDEX, "resize": "student"},
    # the student's map upsampled onto the teacher's grid before it is masked
    "mgd": lambda run: {**_layers(run), "resize": "teacher"},
}
"""Each method's preset options, by the preset's registry name."""

NOT_YET: dict[str, str] = {
    "holistic": "its discriminator needs an optimiser of its own in fit, and logits of at "
                "least 64 x 64 (the digit scenes' are 48 x 48)",
}
"""Registry presets the pipeline does not run yet, and why."""

METHODS: tuple[str, ...] = tuple(OPTIONS)
"""The names ``--method`` takes: the registry's, less :data:`NOT_YET`."""

TRANSLATOR_METHODS = frozenset({"knowledge_adaptation"})
"""The methods that need the translator stage first."""


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is a pipeline method (the message lists them)."""
    if method not in OPTIONS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def method_options(run: Run, method: str) -> dict[str, Any]:
    """The preset options ``method`` takes in ``run``.

    Raises:
        ValueError: ``method`` is not a pipeline method.
    """
    check_method(method)
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
    return presets.get_preset(method)(teacher, student, **method_options(run, method))
