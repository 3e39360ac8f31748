r"""Presets: the paper's method and the baselines, each a few :class:`DistillationTerm`\ s.

Every preset is a typed function that returns a :class:`~segdistill.DistillationWrapper`,
registered by name in :data:`PRESETS` (the pipeline's ``--method`` choices are these
names). The dependency points one way: this module imports the wrapper, the wrapper
knows nothing of the presets. Register your own with :func:`register_preset`.

The presets share their conventions: a layer is a layer path with selectors
(``'encoder[-1]'``, ``"backbone['high']"``) or a :class:`~segdistill.FeatureSpec` that
also declares its channels; ``teacher_output=`` / ``student_output=`` find each model's
logits (presets on logits only); ``resize`` is handed to the loss, the one owner of the
grid, with one default, ``'none'`` (grids may differ by one cell of stride rounding; a
real mismatch raises and names ``resize=``). Channels a preset needs may be left out of
the specs when ``example_input=`` (one batch) is given: they are read from one no-grad
forward of each model at construction, so
:meth:`~segdistill.DistillationWrapper.trainable_parameters` is complete before the
optimiser is built.

Example:
    >>> sorted(PRESETS)
    ['attention_transfer', 'cirkd', 'cwd', 'dist', 'fitnet', 'holistic', 'ifvd', 'kd',
     'knowledge_adaptation', 'mgd', 'pairwise']
    >>> get_preset("kd") is kd
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from segdistill._checks import check_real
from segdistill._features import Resize
from segdistill.adapter import Adapter
from segdistill.feature_spec import FeatureLike, FeatureSpec, as_spec
from segdistill.hooks import OutputSelector, probe_features
from segdistill.losses.adaptation import AdaptationLoss
from segdistill.losses.affinity import AffinityLoss
from segdistill.losses.attention import AttentionTransferLoss
from segdistill.losses.cirkd import CIRKDLoss
from segdistill.losses.cirkd_memory import CIRKDMemory
from segdistill.losses.cwd import CWDLoss
from segdistill.losses.dist import DISTLoss
from segdistill.losses.fitnet import FitNetLoss
from segdistill.losses.holistic import HolisticLoss
from segdistill.losses.ifvd import IFVDLoss
from segdistill.losses.kd import KDLoss
from segdistill.losses.mgd import MGDLoss
from segdistill.losses.pairwise import PairwiseLoss
from segdistill.translator import Translator
from segdistill.wrapper import OUTPUT, DistillationTerm, DistillationWrapper, InputFn

__all__ = [
    "FEATURES",
    "PRESETS",
    "Preset",
    "attention_transfer",
    "cirkd",
    "combine",
    "cwd",
    "dist",
    "fitnet",
    "get_preset",
    "holistic",
    "ifvd",
    "kd",
    "knowledge_adaptation",
    "mgd",
    "pairwise",
    "register_preset",
]

FEATURES = "features"
"""The name under which a single-layer preset captures its layer on each side."""

Preset = Callable[..., DistillationWrapper]
"""A preset: ``preset(teacher, student, **options) -> DistillationWrapper``."""

P = TypeVar("P", bound=Preset)

_REGISTRY: dict[str, Preset] = {}
PRESETS: Mapping[str, Preset] = MappingProxyType(_REGISTRY)
"""Every registered preset by name (read-only; add to it with :func:`register_preset`)."""


def register_preset(name: str) -> Callable[[P], P]:
    """Register a preset function under ``name`` in :data:`PRESETS`; use as a decorator.

    The function keeps its own typed signature; the registry only maps the
    name to it.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not an identifier, or is taken.

    Example:
        >>> @register_preset("my_kd")
        ... def my_kd(teacher: nn.Module, student: nn.Module) -> DistillationWrapper:
        ...     return kd(teacher, student, temperature=2.0)
        >>> get_preset("my_kd") is my_kd
        True
        >>> _ = _REGISTRY.pop("my_kd")  # (keeps the doctest from leaking it)
    """
    if not isinstance(name, str):
        raise TypeError(f"expected a preset name (str), got {type(name).__name__}")
    if not name.isidentifier():
        raise ValueError(f"a preset name must be a Python identifier, got {name!r}")

    def register(preset: P) -> P:
        if name in _REGISTRY:
            raise ValueError(f"a preset named {name!r} is already registered "
                             f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = preset
        return preset

    return register


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``.

    Raises:
        ValueError: no such preset; the message lists the registered names.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown preset {name!r}; the presets are "
                         f"{', '.join(repr(n) for n in sorted(_REGISTRY))}")
    return _REGISTRY[name]


class _Encoder(nn.Module):
    """A translator's encoder as a teacher transform, with the translator's input check."""

    def __init__(self, translator: Translator) -> None:
        super().__init__()
        self.translator = translator

    def forward(self, x: Tensor) -> Tensor:
        return self.translator.encode(x)


def _on_layers(teacher: nn.Module, student: nn.Module, terms: dict[str, DistillationTerm],
               teacher_layer: FeatureLike, student_layer: FeatureLike,
               teacher_input: InputFn | None, student_input: InputFn | None,
               ) -> DistillationWrapper:
    """The wrapper of a preset whose terms read one layer on each side, captured under
    :data:`FEATURES`."""
    return DistillationWrapper(teacher, student, terms,
                               {FEATURES: as_spec(teacher_layer, "teacher_layer")},
                               {FEATURES: as_spec(student_layer, "student_layer")},
                               teacher_input=teacher_input, student_input=student_input)


def _layer_specs(preset: str, teacher: tuple[nn.Module, InputFn | None],
                 student: tuple[nn.Module, InputFn | None], teacher_layer: FeatureLike,
                 student_layer: FeatureLike, example_input: Any,
                 needs: tuple[str, ...] = ()) -> dict[str, FeatureSpec]:
    """Each side's spec, with its channels read on ``example_input`` (through that side's
    input function) when given (one forward per model, each path resolved once); ``needs``
    names the sides whose channels the preset cannot do without."""
    specs = {"teacher": as_spec(teacher_layer, "teacher_layer"),
             "student": as_spec(student_layer, "student_layer")}
    if example_input is not None:
        sides = {"teacher": teacher, "student": student}
        specs = {side: probe_features(sides[side][0], {FEATURES: spec},
                                      _side_input(sides[side][1], example_input), side)[FEATURES]
                 for side, spec in specs.items()}
    missing = [side for side in needs if specs[side].channels is None]
    if missing:
        layers = " and ".join(f"{side}_layer {specs[side].layer!r}" for side in missing)
        raise ValueError(
            f"{preset} needs the channels of {layers}: pass FeatureSpec(layer, channels=C), "
            "or example_input= (one batch) to read them from a forward of both models"
        )
    return specs


def _side_input(make: InputFn | None, batch: Any) -> Any:
    return batch if make is None else make(batch)


def _channels(spec: FeatureSpec) -> int:
    """The channels of a spec that :func:`_layer_specs` has made sure of."""
    if spec.channels is None:  # pragma: no cover - _layer_specs raised already
        raise AssertionError(f"no channels for {spec.layer!r}")
    return spec.channels


@register_preset("knowledge_adaptation")
def knowledge_adaptation(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    translator: Translator,
    example_input: Any = None,
    adaptation_weight: float = 50.0,
    affinity_weight: float = 1.0,
    adapter_layers: int = 3,
    resize: Resize = "none",
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    r"""The paper's method: adaptation and affinity through a trained translator.

    .. math::

        \mathcal{L} = \beta\,\mathcal{L}_{adapt}\big(C_f(\phi_s), E(\phi_t)\big)
            + \gamma\,\mathcal{L}_{aff}\big(C_a(\phi_s), E(\phi_t)\big),
        \quad \beta = 50,\ \gamma = 1

    (add the task's cross-entropy yourself; He et al., CVPR 2019). :math:`E`
    is the trained translator's encoder, frozen; :math:`C_f` and :math:`C_a`
    are two new :class:`~segdistill.Adapter`\ s trained with the student. A
    weight of 0 leaves its term out altogether (no adapter, no cost), which
    is how the paper's ablations of each term alone are run.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: the teacher's last feature map :math:`\phi_t`, the one
            the translator was trained on (its channels are the translator's).
        student_layer: the student's last feature map :math:`\phi_s`; a
            :class:`~segdistill.FeatureSpec` with its channels :math:`C_s`, or a
            layer path with ``example_input``.
        translator: the translator trained on the teacher's features (stage 1).
        example_input: one batch both models take; with it, the channels are
            read and the translator is checked against ``teacher_layer`` now.
        adaptation_weight: :math:`\beta`.
        affinity_weight: :math:`\gamma`.
        adapter_layers: conv layers per adapter (the paper's appendix: 3).
        resize: the grid rule of both losses (see
            :func:`~segdistill._features.align_grids`).
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`); ``example_input`` goes through it.
        student_input: the same for the student.

    Returns:
        The wrapper, with terms ``'adaptation'`` and ``'affinity'``.

    Raises:
        TypeError: ``translator`` is not a :class:`~segdistill.Translator`.
        ValueError: both weights are 0; the student's channels are neither in
            its spec nor read from ``example_input``; the translator's channels
            differ from those at ``teacher_layer``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        ...                         nn.Conv2d(4, 5, 1))  # output stride 2: the encoded grid
        >>> wrapper = knowledge_adaptation(
        ...     teacher, student, teacher_layer="1", student_layer="1",
        ...     translator=Translator(8, latent_channels=6), example_input=torch.zeros(1, 3, 8, 8))
        >>> wrapper.terms["affinity"].student_adapter.in_channels
        4
        >>> round(wrapper(torch.randn(2, 3, 8, 8)).losses["affinity"].item(), 4)
        0.1049
    """
    if not isinstance(translator, Translator):
        raise TypeError(f"expected translator to be a segdistill.Translator, got "
                        f"{type(translator).__name__}")
    weights = {"adaptation": check_real("adaptation_weight", adaptation_weight, minimum=0.0),
               "affinity": check_real("affinity_weight", affinity_weight, minimum=0.0)}
    if not any(weights.values()):
        raise ValueError("adaptation_weight and affinity_weight are both 0: nothing to distil")
    specs = _layer_specs("knowledge_adaptation", (teacher, teacher_input),
                         (student, student_input), teacher_layer, student_layer,
                         example_input, needs=("student",))
    t_spec, s_spec = specs["teacher"], specs["student"]
    if t_spec.channels is not None and t_spec.channels != translator.in_channels:
        raise ValueError(
            f"the translator takes {translator.in_channels} channels but the teacher's layer "
            f"{t_spec.layer!r} has {t_spec.channels}: pass the teacher_layer the "
            "translator was trained on, or a translator trained on this one"
        )
    t_spec = replace(t_spec, channels=translator.in_channels)
    encoder = _Encoder(translator)
    losses: dict[str, nn.Module] = {"adaptation": AdaptationLoss(resize=resize),
                                    "affinity": AffinityLoss(resize=resize)}
    terms = {
        name: DistillationTerm(
            loss, student=FEATURES, teacher=FEATURES, weight=weights[name],
            student_adapter=Adapter(_channels(s_spec), translator.latent_channels,
                                    adapter_layers),
            teacher_transform=encoder,
        )
        for name, loss in losses.items()
        if weights[name] > 0
    }
    translator.eval().requires_grad_(False)  # the decoder too: stage 2 uses the encoder only
    return _on_layers(teacher, student, terms, t_spec, s_spec,
                      teacher_input, student_input)


@register_preset("kd")
def kd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    temperature: float = 4.0,
    weight: float = 1.0,
    ignore_index: int | None = 255,
    resize: Resize = "none",
    validate_args: bool = True,
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Hinton et al.'s knowledge distillation on the logits, pixel-wise
    (:class:`~segdistill.KDLoss`).

    Pass the labels as ``target`` to the wrapper to leave out the pixels
    labelled ``ignore_index``; they follow the one label rule of
    :func:`~segdistill.kd_loss` (any grid, nearest-resized; values in
    ``[0, classes)`` or ``ignore_index``), standalone or here alike.

    Args:
        teacher: the trained teacher.
        student: the student.
        temperature: :math:`T > 0`.
        weight: the term's weight.
        ignore_index: the label to leave out, or ``None``.
        resize: the grid rule; logits at other resolutions (a Hugging Face
            SegFormer predicts at 1/4 of the input, torchvision models at the
            input's size) need ``'teacher'`` (the student's logits upsampled
            onto the teacher's grid, as in the KD baseline of He et al.) or
            ``'student'``.
        validate_args: check the label values every step (one host sync).
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'kd'``.
    """
    term = DistillationTerm(
        KDLoss(temperature=temperature, ignore_index=ignore_index, resize=resize,
               validate_args=validate_args),
        student=OUTPUT, teacher=OUTPUT, weight=weight, uses_target=True,
    )
    return DistillationWrapper(teacher, student, {"kd": term}, teacher_output=teacher_output,
                               student_output=student_output,
                               teacher_input=teacher_input, student_input=student_input)


@register_preset("fitnet")
def fitnet(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    example_input: Any = None,
    weight: float = 1.0,
    resize: Resize = "none",
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Romero et al.'s FitNet hint (:class:`~segdistill.FitNetLoss`): student features
    through a 1x1 regressor, L2 to the teacher's.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: the teacher's hint: a :class:`~segdistill.FeatureSpec`
            with its channels, or a layer path with ``example_input``.
        student_layer: the student's guided layer, likewise.
        example_input: one batch both models take, to read the channels.
        weight: the term's weight.
        resize: the grid rule; ``'teacher'`` upsamples the student's map onto
            the teacher's grid, as in the FitNet baseline of He et al.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`); ``example_input`` goes through it.
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'fitnet'``.

    Raises:
        ValueError: a side's channels are neither in its spec nor read from
            ``example_input``.
    """
    specs = _layer_specs("fitnet", (teacher, teacher_input), (student, student_input),
                         teacher_layer, student_layer,
                         example_input, needs=("student", "teacher"))
    term = DistillationTerm(
        FitNetLoss(_channels(specs["student"]), _channels(specs["teacher"]), resize=resize),
        student=FEATURES, teacher=FEATURES, weight=weight,
    )
    return _on_layers(teacher, student, {"fitnet": term}, specs["teacher"], specs["student"],
                      teacher_input, student_input)


@register_preset("attention_transfer")
def attention_transfer(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    weight: float = 1000.0,
    resize: Resize = "none",
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Zagoruyko and Komodakis's attention transfer
    (:class:`~segdistill.AttentionTransferLoss`), with their weight of 1000.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path (or spec) on the teacher.
        student_layer: layer path (or spec) on the student (any channel count).
        weight: the term's weight.
        resize: the grid rule (``'teacher'`` for the student's map on the
            teacher's grid).
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'attention'``.
    """
    term = DistillationTerm(AttentionTransferLoss(resize=resize), student=FEATURES,
                            teacher=FEATURES, weight=weight)
    return _on_layers(teacher, student, {"attention": term}, teacher_layer, student_layer,
                      teacher_input, student_input)


@register_preset("pairwise")
def pairwise(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    weight: float = 1.0,
    patch_size: int | tuple[int, int] | None = None,
    resize: Resize = "none",
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Liu et al.'s pair-wise similarity distillation (:class:`~segdistill.PairwiseLoss`),
    memory-linear, with optional patch pooling.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path (or spec) on the teacher.
        student_layer: layer path (or spec) on the student (any channel count).
        weight: the term's weight.
        patch_size: pool the maps into patches of this size first.
        resize: the grid rule.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'pairwise'``.
    """
    term = DistillationTerm(PairwiseLoss(patch_size=patch_size, resize=resize),
                            student=FEATURES, teacher=FEATURES, weight=weight)
    return _on_layers(teacher, student, {"pairwise": term}, teacher_layer, student_layer,
                      teacher_input, student_input)


@register_preset("cwd")
def cwd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    temperature: float = 4.0,
    weight: float = 3.0,
    teacher_layer: FeatureLike | None = None,
    student_layer: FeatureLike | None = None,
    example_input: Any = None,
    feature_weight: float = 50.0,
    logits: bool = True,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Shu et al.'s channel-wise distillation (:class:`~segdistill.CWDLoss`) on the logits
    and, with a layer pair, on intermediate features too.

    On the logits (term ``'cwd'``) the weight is the authors' 3 at temperature 4;
    on features (term ``'cwd_features'``, when ``teacher_layer`` and
    ``student_layer`` are given) CIRKD's baseline scripts use weight 50 at the
    same temperature. Where the channel counts differ, the student's map passes
    through a bias-free 1x1 convolution onto the teacher's channels, trained
    with the student (the connector mmrazor's configs put there; the CWD paper
    distils maps of equal channels).

    Args:
        teacher: the trained teacher.
        student: the student.
        temperature: :math:`T > 0`, for both terms.
        weight: the logit term's weight.
        teacher_layer: the teacher's feature map for the feature term (a
            :class:`~segdistill.FeatureSpec` with its channels, or a layer
            path with ``example_input``), or ``None`` for logits only.
        student_layer: the student's feature map, likewise.
        example_input: one batch both models take, to read the channels.
        feature_weight: the feature term's weight.
        logits: include the logit term (``False``: features only).
        resize: the grid rule of both terms; logits at other resolutions need
            ``'teacher'`` or ``'student'``.
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`); ``example_input`` goes through it.
        student_input: the same for the student.

    Returns:
        The wrapper, with the terms ``'cwd'`` and/or ``'cwd_features'``.

    Raises:
        ValueError: only one of the layers is given, neither term is asked
            for, or a side's channels are neither in its spec nor read from
            ``example_input``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
        >>> wrapper = cwd(teacher, student, teacher_layer="1", student_layer="1",
        ...               example_input=torch.zeros(1, 3, 8, 8))
        >>> sorted(wrapper(torch.randn(2, 3, 8, 8)).losses)
        ['cwd', 'cwd_features']
        >>> wrapper.terms["cwd_features"].student_adapter
        Conv2d(4, 8, kernel_size=(1, 1), stride=(1, 1), bias=False)
    """
    if (teacher_layer is None) != (student_layer is None):
        raise ValueError("cwd on features needs both teacher_layer and student_layer, got only "
                         + ("teacher_layer" if student_layer is None else "student_layer"))
    if not logits and teacher_layer is None:
        raise ValueError("logits=False and no layers: nothing to distil; pass teacher_layer "
                         "and student_layer for CWD on features")
    terms: dict[str, DistillationTerm] = {}
    if logits:
        terms["cwd"] = DistillationTerm(CWDLoss(temperature=temperature, resize=resize),
                                        student=OUTPUT, teacher=OUTPUT, weight=weight)
    layers: tuple[dict[str, FeatureLike], dict[str, FeatureLike]] = ({}, {})
    if teacher_layer is not None and student_layer is not None:
        specs = _layer_specs("cwd", (teacher, teacher_input), (student, student_input),
                         teacher_layer, student_layer,
                             example_input, needs=("student", "teacher"))
        c_s, c_t = _channels(specs["student"]), _channels(specs["teacher"])
        terms["cwd_features"] = DistillationTerm(
            CWDLoss(temperature=temperature, resize=resize), student=FEATURES, teacher=FEATURES,
            weight=feature_weight,
            student_adapter=None if c_s == c_t else nn.Conv2d(c_s, c_t, 1, bias=False))
        layers = ({FEATURES: specs["teacher"]}, {FEATURES: specs["student"]})
    return DistillationWrapper(teacher, student, terms, *layers, teacher_output=teacher_output,
                               student_output=student_output,
                               teacher_input=teacher_input, student_input=student_input)


@register_preset("dist")
def dist(
    teacher: nn.Module,
    student: nn.Module,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    weight: float = 1.0,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    r"""Huang et al.'s DIST on the logits (:class:`~segdistill.DISTLoss`), in the
    segmentation form of their code (``hunto/DIST_KD``): :math:`\beta = \gamma = 1`,
    :math:`\tau = 1`, term weight 1.

    The intra-class term correlates every pixel of the batch, so the term is one
    number per step (no ignore label, as in the reference). DIST_KD also puts
    the loss, weighted 0.4, on the auxiliary head's logits; add a second term on
    that output for it.

    Args:
        teacher: the trained teacher.
        student: the student.
        beta: the inter-class weight :math:`\beta`.
        gamma: the intra-class weight :math:`\gamma`.
        temperature: :math:`\tau > 0` (each term is scaled by :math:`\tau^2`).
        weight: the term's weight.
        resize: the grid rule; logits at other resolutions need ``'teacher'``
            or ``'student'``.
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'dist'``.
    """
    term = DistillationTerm(
        DISTLoss(beta=beta, gamma=gamma, temperature=temperature, resize=resize),
        student=OUTPUT, teacher=OUTPUT, weight=weight,
    )
    return DistillationWrapper(teacher, student, {"dist": term}, teacher_output=teacher_output,
                               student_output=student_output,
                               teacher_input=teacher_input, student_input=student_input)


@register_preset("mgd")
def mgd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    example_input: Any = None,
    weight: float = 2e-5,
    mask_ratio: float = 0.75,
    resize: Resize = "none",
    rng: torch.Generator | None = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    r"""Yang et al.'s masked generative distillation (:class:`~segdistill.MGDLoss`):
    the student's feature, aligned by a 1x1 convolution where channels differ and
    masked at random positions, rebuilds the teacher's through a generator; with
    their segmentation weight :math:`\alpha = 2 \times 10^{-5}` and ratio 0.75.

    The reference distils the last backbone stage (``backbone.layer4``: 512
    channels on ResNet-18, 2048 on ResNet-101) and adds a CWD term on the
    logits (temperature 4, weight 3), which this preset leaves to you.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: the teacher's feature: a :class:`~segdistill.FeatureSpec`
            with its channels, or a layer path with ``example_input``.
        student_layer: the student's feature, likewise.
        example_input: one batch both models take, to read the channels.
        weight: the term's weight :math:`\alpha`.
        mask_ratio: :math:`\lambda \in [0, 1]`, the fraction of positions masked.
        resize: the grid rule (``'teacher'`` upsamples the student's feature
            onto the teacher's grid before masking).
        rng: a ``torch.Generator`` on the features' device for reproducible
            masks, or ``None``.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`); ``example_input`` goes through it.
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'mgd'``.

    Raises:
        ValueError: a side's channels are neither in its spec nor read from
            ``example_input``.
    """
    specs = _layer_specs("mgd", (teacher, teacher_input), (student, student_input),
                         teacher_layer, student_layer,
                         example_input, needs=("student", "teacher"))
    term = DistillationTerm(
        MGDLoss(_channels(specs["student"]), _channels(specs["teacher"]), mask_ratio=mask_ratio,
                resize=resize, rng=rng),
        student=FEATURES, teacher=FEATURES, weight=weight,
    )
    return _on_layers(teacher, student, {"mgd": term}, specs["teacher"], specs["student"],
                      teacher_input, student_input)


@register_preset("ifvd")
def ifvd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    num_classes: int,
    weight: float = 20.0,
    ignore_index: int | None = 255,
    resize: Resize = "none",
    validate_args: bool = True,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """Wang et al.'s intra-class feature variation distillation
    (:class:`~segdistill.IFVDLoss`), with the weight 20 of CIRKD's scripts.

    Pass the labels as ``target`` to the wrapper: the class prototypes are the
    means of each class's features, so the term needs them every step. They
    follow the one label rule (any grid, nearest-resized onto the feature grid;
    values in ``[0, num_classes)`` or ``ignore_index``).

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path (or spec) on the teacher; CIRKD takes the
            last feature map before the classifier.
        student_layer: layer path (or spec) on the student (any channel count).
        num_classes: the number of classes the labels hold.
        weight: the term's weight.
        ignore_index: the label to leave out, or ``None``.
        resize: the grid rule (``'student'`` or ``'teacher'`` for maps at
            different output strides).
        validate_args: check the label values every step (one host sync).
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'ifvd'``.
    """
    term = DistillationTerm(
        IFVDLoss(num_classes, ignore_index=ignore_index, resize=resize,
                 validate_args=validate_args),
        student=FEATURES, teacher=FEATURES, weight=weight, uses_target=True,
    )
    return _on_layers(teacher, student, {"ifvd": term}, teacher_layer, student_layer,
                      teacher_input, student_input)


@register_preset("holistic")
def holistic(
    teacher: nn.Module,
    student: nn.Module,
    *,
    num_classes: int,
    weight: float = 0.001,
    discriminator_weight: float = 0.1,
    image_channels: int = 0,
    width: int = 64,
    resize: Resize = "none",
    min_size: int | None = None,
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    """SKD's holistic term (Liu et al., CVPR 2019; :class:`~segdistill.HolisticLoss`): a
    discriminator on the logits trained against the teacher's, with CIRKD's weights, 0.001
    on the student's term and 0.1 on the discriminator's hinge loss.

    The discriminator needs an optimiser of its own: build it on
    :meth:`~segdistill.DistillationWrapper.separately_optimized_parameters` (which
    :meth:`~segdistill.DistillationWrapper.trainable_parameters` leaves out) with
    :func:`~segdistill.discriminator_optimizer` (Adam, 4e-4, betas (0.9, 0.99)), and
    step it beside the student's after the same backward: in training mode the
    wrapper attaches the discriminator's loss to the term (with value 0), so that one
    backward trains both. The discriminator takes logits of at least 64 x 64.

    Args:
        teacher: the trained teacher.
        student: the student.
        num_classes: the logits' classes.
        weight: the student's term's weight (CIRKD's ``--lambda-adv``).
        discriminator_weight: the discriminator loss's (CIRKD's ``--lambda-d``).
        image_channels: 0 for the reference code's discriminator on the logits
            alone, 3 for the paper's, conditioned on the input images (the
            wrapper's inputs must then be the image batch).
        width: the discriminator's width (the reference's 64).
        resize: the grid rule between the two logits.
        min_size: upsample logits whose shorter side is below it before the
            discriminator (see :class:`~segdistill.HolisticLoss`; for small images).
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`).
        student_input: the same for the student.

    Returns:
        The wrapper, with the term ``'holistic'``.
    """
    term = DistillationTerm(
        HolisticLoss(num_classes, image_channels=image_channels, width=width,
                     discriminator_weight=discriminator_weight, resize=resize,
                     min_size=min_size),
        student=OUTPUT, teacher=OUTPUT, weight=weight, uses_inputs=image_channels > 0,
    )
    return DistillationWrapper(teacher, student, {"holistic": term},
                               teacher_output=teacher_output, student_output=student_output,
                               teacher_input=teacher_input, student_input=student_input)


@register_preset("cirkd")
def cirkd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: FeatureLike,
    student_layer: FeatureLike,
    num_classes: int,
    example_input: Any = None,
    minibatch_weight: float = 1.0,
    memory_pixel_weight: float = 0.1,
    memory_region_weight: float = 0.1,
    kd_weight: float = 1.0,
    kd_temperature: float = 1.0,
    temperature: float = 0.1,
    ignore_index: int | None = 255,
    resize: Resize = "none",
    validate_args: bool = True,
    seed: int = 0,
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
    teacher_input: InputFn | None = None,
    student_input: InputFn | None = None,
) -> DistillationWrapper:
    r"""Yang et al.'s cross-image relational KD (CVPR 2022), as its reference trains it:
    the mini-batch term (:class:`~segdistill.CIRKDLoss`, weight 1, exact and
    memory-linear), the memory term (:class:`~segdistill.CIRKDMemory`: pixel and region
    queues, 0.1 each; the reference uses 0.01 on Pascal VOC) on the last feature maps,
    and pixel KD on the logits (weight 1, :math:`T = 1`). Pass the labels as ``target``
    to the wrapper. A weight of 0 leaves its term out.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: the teacher's last feature map: a :class:`~segdistill.FeatureSpec`
            with its channels, or a layer path with ``example_input``.
        student_layer: the student's, likewise (the memory term's head maps its
            channels onto the teacher's).
        num_classes: :math:`K`, for the memory's per-class queues.
        example_input: one batch both models take, to read the channels.
        minibatch_weight: the mini-batch term's weight.
        memory_pixel_weight: :math:`\lambda_p` of the memory term.
        memory_region_weight: :math:`\lambda_r` of the memory term.
        kd_weight: the logits KD term's weight.
        kd_temperature: its temperature.
        temperature: :math:`\tau` of the mini-batch relations (the reference's 0.1).
        ignore_index: the label to leave out, or ``None``.
        resize: the grid rule of every term.
        validate_args: check the label values every step (one host sync per term).
        seed: the memory's seed (its sampling is reproducible and resumes exactly).
        teacher_output: how to find the teacher's logits.
        student_output: how to find the student's logits.
        teacher_input: makes the teacher's input from the batch (its dtype,
            normalisation, resolution or keywords; see
            :class:`~segdistill.DistillationWrapper`); ``example_input`` goes through it.
        student_input: the same for the student.

    Returns:
        The wrapper, with terms ``'minibatch'``, ``'memory'`` and ``'kd'``.

    Raises:
        ValueError: every weight is 0; a side's channels are neither in its spec nor
            read from ``example_input``.
    """
    memory_on = memory_pixel_weight > 0 or memory_region_weight > 0
    if not (minibatch_weight > 0 or memory_on or kd_weight > 0):
        raise ValueError("every weight is 0: nothing to distil")
    specs = _layer_specs("cirkd", (teacher, teacher_input), (student, student_input),
                         teacher_layer, student_layer,
                         example_input, needs=("student", "teacher"))
    terms: dict[str, DistillationTerm] = {}
    if minibatch_weight > 0:
        terms["minibatch"] = DistillationTerm(CIRKDLoss(temperature=temperature, resize=resize),
                                              student=FEATURES, teacher=FEATURES,
                                              weight=minibatch_weight)
    if memory_on:
        terms["memory"] = DistillationTerm(
            CIRKDMemory(_channels(specs["student"]), _channels(specs["teacher"]), num_classes,
                        pixel_weight=memory_pixel_weight, region_weight=memory_region_weight,
                        ignore_index=ignore_index, resize=resize,
                        validate_args=validate_args, seed=seed),
            student=FEATURES, teacher=FEATURES, weight=1.0, uses_target=True,
        )
    if kd_weight > 0:
        terms["kd"] = DistillationTerm(
            KDLoss(temperature=kd_temperature, ignore_index=ignore_index, resize=resize,
                   validate_args=validate_args),
            student=OUTPUT, teacher=OUTPUT, weight=kd_weight, uses_target=True,
        )
    return DistillationWrapper(teacher, student, terms, {FEATURES: specs["teacher"]},
                               {FEATURES: specs["student"]}, teacher_output=teacher_output,
                               student_output=student_output,
                               teacher_input=teacher_input, student_input=student_input)


def _agreed(wrappers: tuple[DistillationWrapper, ...], attribute: str) -> Any:
    """The one non-``None`` value of ``attribute`` the wrappers agree on (``None`` if none)."""
    values = [getattr(w, attribute) for w in wrappers if getattr(w, attribute) is not None]
    if any(v is not values[0] and v != values[0] for v in values[1:]):
        raise ValueError(f"the wrappers have different {attribute}= ({values}); combine "
                         "wrappers built with the same one")
    return values[0] if values else None


def _merged_layers(wrappers: tuple[DistillationWrapper, ...], side: str,
                   ) -> tuple[dict[str, FeatureSpec], list[dict[str, str]]]:
    """One side's layers of all the wrappers under names that do not clash (a layer that
    two wrappers capture alike is captured once), and each wrapper's renaming."""
    merged: dict[str, FeatureSpec] = {}
    renames: list[dict[str, str]] = []
    for index, wrapper in enumerate(wrappers):
        rename: dict[str, str] = {OUTPUT: OUTPUT}
        layers = wrapper.teacher_layers if side == "teacher" else wrapper.student_layers
        for name, spec in layers.items():
            same = [n for n, s in merged.items() if s == spec]  # call and tokens compared too
            if same:
                rename[name] = same[0]
                continue
            new = name if name not in merged else f"{name}_{index}"
            merged[new], rename[name] = spec, new
        renames.append(rename)
    return merged, renames


def combine(*wrappers: DistillationWrapper) -> DistillationWrapper:
    """One wrapper with every term of ``wrappers``, built on the same teacher and student
    (e.g. a feature method plus pixel KD plus the holistic term, as CIRKD's scripts run
    their baselines).

    Each layer is captured once however many terms read it; feature names that clash
    are renamed. The part wrappers' hooks are removed (use the combined wrapper only).

    Args:
        wrappers: at least two wrappers of the same teacher and student, each term name
            in one of them only.

    Returns:
        The combined wrapper; its terms keep their names and weights.

    Raises:
        ValueError: fewer than two wrappers, other models, a term name in two of them,
            or different output selectors or input functions.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
        >>> both = combine(kd(teacher, student),
        ...                attention_transfer(teacher, student, teacher_layer="1",
        ...                                   student_layer="1"))
        >>> sorted(both(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)).losses)
        ['attention', 'kd']
    """
    if len(wrappers) < 2 or not all(isinstance(w, DistillationWrapper) for w in wrappers):
        raise ValueError(f"expected at least two DistillationWrappers, got "
                         f"{[type(w).__name__ for w in wrappers]}")
    first = wrappers[0]
    if any(w.teacher is not first.teacher or w.student is not first.student
           for w in wrappers[1:]):
        raise ValueError("combine wrappers of the same teacher and student modules")
    names = [name for w in wrappers for name in w.terms]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"term names {clashes} are in more than one wrapper; a term would "
                         "count twice (e.g. pixel KD both in 'cirkd' and in 'kd')")
    options = {a: _agreed(wrappers, a) for a in ("teacher_output", "student_output",
                                                 "teacher_input", "student_input")}
    teacher_layers, t_renames = _merged_layers(wrappers, "teacher")
    student_layers, s_renames = _merged_layers(wrappers, "student")
    terms: dict[str, DistillationTerm] = {}
    for wrapper, t_names, s_names in zip(wrappers, t_renames, s_renames, strict=True):
        for name, module in wrapper.terms.items():
            term = cast(DistillationTerm, module)
            terms[name] = DistillationTerm(
                term.loss, student=s_names[term.student], teacher=t_names[term.teacher],
                weight=term.weight, student_adapter=term.student_adapter,
                teacher_transform=term.teacher_transform, uses_target=term.uses_target,
                uses_inputs=term.uses_inputs)
        wrapper.remove_hooks()
    return DistillationWrapper(first.teacher, first.student, terms, teacher_layers,
                               student_layers, save_frozen=any(w.save_frozen for w in wrappers),
                               **options)
