r"""Presets: the paper's method and the baselines, each a few :class:`DistillationTerm`\ s.

Every preset returns a :class:`~segdistill.DistillationWrapper` and shares
its conventions: layer paths with selectors (``'encoder[-1]'``,
``"backbone['high']"``), ``teacher_output=`` / ``student_output=`` to find
each model's logits, and one resize rule with one default, ``resize='none'``
(grids may differ by one cell of stride rounding; a real mismatch raises and
names ``resize=``). Channel counts a preset needs may be left out when
``example_input=`` (one batch) is given: they are read from one no-grad
forward of both models, at construction, so
:meth:`~segdistill.DistillationWrapper.trainable_parameters` is complete
before the optimiser is built.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from segdistill._checks import check_real
from segdistill._features import Resize
from segdistill.adapter import Adapter
from segdistill.hooks import OutputSelector, feature_shapes
from segdistill.losses.adaptation import AdaptationLoss
from segdistill.losses.affinity import AffinityLoss
from segdistill.losses.attention import AttentionTransferLoss
from segdistill.losses.cwd import CWDLoss
from segdistill.losses.fitnet import FitNetLoss
from segdistill.losses.kd import KDLoss
from segdistill.losses.pairwise import PairwiseLoss
from segdistill.translator import Translator
from segdistill.wrapper import OUTPUT, DistillationTerm, DistillationWrapper

__all__ = ["attention_transfer", "cwd", "fitnet", "kd", "knowledge_adaptation", "pairwise"]

FEATURES = "features"
"""The name under which a single-layer preset captures its layer on each side."""


class _Encoder(nn.Module):
    """A translator's encoder as a teacher transform, with the translator's input check."""

    def __init__(self, translator: Translator) -> None:
        super().__init__()
        self.translator = translator

    def forward(self, x: Tensor) -> Tensor:
        return self.translator.encode(x)


def _on_layers(teacher: nn.Module, student: nn.Module, terms: dict[str, DistillationTerm],
               teacher_layer: str, student_layer: str, teacher_output: OutputSelector,
               student_output: OutputSelector) -> DistillationWrapper:
    """The wrapper of a preset whose terms read one layer on each side, captured under
    :data:`FEATURES`."""
    return DistillationWrapper(teacher, student, terms, {FEATURES: teacher_layer},
                               {FEATURES: student_layer}, teacher_output=teacher_output,
                               student_output=student_output)


def _layer_channels(model: nn.Module, layer: str, example_input: Any, side: str) -> int:
    """The channels of the 4-D map at ``layer``, from one no-grad forward on ``example_input``."""
    shape = feature_shapes(model, {FEATURES: layer}, example_input, with_output=False,
                           owner=side)[FEATURES]
    if len(shape) != 4:
        raise ValueError(f"expected the {side}'s layer {layer!r} to give a 4-D (B, C, H, W) "
                         f"tensor, got shape {tuple(shape)}")
    return int(shape[1])


def _channels(
    preset: str,
    example_input: Any,
    given: dict[str, int | None],
    layers: dict[str, tuple[nn.Module, str]],
) -> dict[str, int]:
    """The channel counts a preset needs: as given, or read on ``example_input``.

    ``given`` maps ``'student_channels'`` / ``'teacher_channels'`` to the user's
    value (``None``: read it); ``layers`` maps ``'student'`` / ``'teacher'`` to
    ``(model, layer path)``. Both models run once when ``example_input`` is
    given, and a count given beside it is checked against the one read.
    """
    if example_input is None:
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"{preset} needs {' and '.join(f'{m}=' for m in missing)} (the channels at "
                f"{' and '.join(f'{name[:7]}_layer' for name in missing)}), or example_input= "
                "(one batch) to read them from a forward of both models"
            )
        return {name: int(value) for name, value in given.items() if value is not None}
    read = {f"{side}_channels": _layer_channels(model, layer, example_input, side)
            for side, (model, layer) in layers.items()}
    for name, value in given.items():
        if value is not None and value != read[name]:
            side = name[:7]
            raise ValueError(
                f"{preset}: {name}={value}, but the {side}'s layer {layers[side][1]!r} has "
                f"{read[name]} channels on example_input; pass {name}={read[name]} or leave "
                "it out"
            )
    return read


def knowledge_adaptation(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: str,
    student_layer: str,
    translator: Translator,
    student_channels: int | None = None,
    example_input: Any = None,
    adaptation_weight: float = 50.0,
    affinity_weight: float = 1.0,
    adapter_layers: int = 3,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
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
        teacher_layer: layer path of the teacher's last feature map
            :math:`\phi_t`, the one the translator was trained on.
        student_layer: layer path of the student's last feature map :math:`\phi_s`.
        translator: the translator trained on the teacher's features (stage 1).
        student_channels: :math:`C_s`, the channels at ``student_layer``; read
            from ``example_input`` when left out.
        example_input: one batch both models take; with it, the channels are
            read and the translator is checked against ``teacher_layer`` now.
        adaptation_weight: :math:`\beta`.
        affinity_weight: :math:`\gamma`.
        adapter_layers: conv layers per adapter (the paper's appendix: 3).
        resize: the grid rule (see :class:`~segdistill.DistillationTerm`).
        teacher_output: how to find the teacher's logits (unused by these terms).
        student_output: how to find the student's logits (unused by these terms).

    Returns:
        The wrapper, with terms ``'adaptation'`` and ``'affinity'``.

    Raises:
        TypeError: ``translator`` is not a :class:`~segdistill.Translator`.
        ValueError: both weights are 0; neither ``student_channels`` nor
            ``example_input`` is given; on ``example_input``, the translator's
            channels differ from those at ``teacher_layer``.

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
    channels = _channels(
        "knowledge_adaptation", example_input, {"student_channels": student_channels},
        {"student": (student, student_layer), "teacher": (teacher, teacher_layer)},
    )
    if "teacher_channels" in channels and channels["teacher_channels"] != translator.in_channels:
        raise ValueError(
            f"the translator takes {translator.in_channels} channels but the teacher's layer "
            f"{teacher_layer!r} has {channels['teacher_channels']}: pass the teacher_layer the "
            "translator was trained on, or a translator trained on this one"
        )
    encoder = _Encoder(translator)
    losses: dict[str, nn.Module] = {"adaptation": AdaptationLoss(), "affinity": AffinityLoss()}
    terms = {
        name: DistillationTerm(
            loss, student=FEATURES, teacher=FEATURES, weight=weights[name], resize=resize,
            student_adapter=Adapter(channels["student_channels"], translator.latent_channels,
                                    adapter_layers),
            teacher_transform=encoder, student_channels=channels["student_channels"],
            teacher_channels=translator.in_channels,
        )
        for name, loss in losses.items()
        if weights[name] > 0
    }
    translator.eval().requires_grad_(False)  # the decoder too: stage 2 uses the encoder only
    return _on_layers(teacher, student, terms, teacher_layer, student_layer,
                      teacher_output, student_output)


def kd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    temperature: float = 4.0,
    weight: float = 1.0,
    ignore_index: int | None = 255,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
) -> DistillationWrapper:
    """Hinton et al.'s knowledge distillation on the logits, pixel-wise
    (:class:`~segdistill.KDLoss`).

    Pass the labels as ``target`` to the wrapper to leave out the pixels
    labelled ``ignore_index``; they are checked against the logits they mask.

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
            ``'student'``. Labels must be on the grid the logits end on.
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.

    Returns:
        The wrapper, with the term ``'kd'``.
    """
    term = DistillationTerm(
        KDLoss(temperature=temperature, ignore_index=ignore_index),
        student=OUTPUT, teacher=OUTPUT, weight=weight, resize=resize, uses_target=True,
    )
    return DistillationWrapper(teacher, student, {"kd": term}, teacher_output=teacher_output,
                               student_output=student_output)


def fitnet(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: str,
    student_layer: str,
    student_channels: int | None = None,
    teacher_channels: int | None = None,
    example_input: Any = None,
    weight: float = 1.0,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
) -> DistillationWrapper:
    """Romero et al.'s FitNet hint (:class:`~segdistill.FitNetLoss`): student features
    through a 1x1 regressor, L2 to the teacher's.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path of the teacher's hint.
        student_layer: layer path of the student's guided layer.
        student_channels: the channels at ``student_layer`` (read from
            ``example_input`` when left out).
        teacher_channels: the channels at ``teacher_layer`` (likewise).
        example_input: one batch both models take.
        weight: the term's weight.
        resize: the grid rule; ``'teacher'`` upsamples the student's map onto
            the teacher's grid, as in the FitNet baseline of He et al.
        teacher_output: how to find the teacher's logits (unused by this term).
        student_output: how to find the student's logits (unused by this term).

    Returns:
        The wrapper, with the term ``'fitnet'``.

    Raises:
        ValueError: a channel count is missing and there is no ``example_input``.
    """
    channels = _channels(
        "fitnet", example_input,
        {"student_channels": student_channels, "teacher_channels": teacher_channels},
        {"student": (student, student_layer), "teacher": (teacher, teacher_layer)},
    )
    term = DistillationTerm(
        FitNetLoss(channels["student_channels"], channels["teacher_channels"]),
        student=FEATURES, teacher=FEATURES, weight=weight, resize=resize,
        student_channels=channels["student_channels"],
        teacher_channels=channels["teacher_channels"],
    )
    return _on_layers(teacher, student, {"fitnet": term}, teacher_layer, student_layer,
                      teacher_output, student_output)


def attention_transfer(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: str,
    student_layer: str,
    weight: float = 1000.0,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
) -> DistillationWrapper:
    """Zagoruyko and Komodakis's attention transfer
    (:class:`~segdistill.AttentionTransferLoss`), with their weight of 1000.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path on the teacher.
        student_layer: layer path on the student (any channel count).
        weight: the term's weight.
        resize: the grid rule (``'teacher'`` for the student's map on the
            teacher's grid).
        teacher_output: how to find the teacher's logits (unused by this term).
        student_output: how to find the student's logits (unused by this term).

    Returns:
        The wrapper, with the term ``'attention'``.
    """
    term = DistillationTerm(AttentionTransferLoss(), student=FEATURES, teacher=FEATURES,
                            weight=weight, resize=resize)
    return _on_layers(teacher, student, {"attention": term}, teacher_layer, student_layer,
                      teacher_output, student_output)


def pairwise(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_layer: str,
    student_layer: str,
    weight: float = 1.0,
    patch_size: int | tuple[int, int] | None = None,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
) -> DistillationWrapper:
    """Liu et al.'s pair-wise similarity distillation (:class:`~segdistill.PairwiseLoss`),
    memory-linear, with optional patch pooling.

    Args:
        teacher: the trained teacher.
        student: the student.
        teacher_layer: layer path on the teacher.
        student_layer: layer path on the student (any channel count).
        weight: the term's weight.
        patch_size: pool the maps into patches of this size first.
        resize: the grid rule.
        teacher_output: how to find the teacher's logits (unused by this term).
        student_output: how to find the student's logits (unused by this term).

    Returns:
        The wrapper, with the term ``'pairwise'``.
    """
    term = DistillationTerm(PairwiseLoss(patch_size=patch_size), student=FEATURES,
                            teacher=FEATURES, weight=weight, resize=resize)
    return _on_layers(teacher, student, {"pairwise": term}, teacher_layer, student_layer,
                      teacher_output, student_output)


def cwd(
    teacher: nn.Module,
    student: nn.Module,
    *,
    temperature: float = 4.0,
    weight: float = 3.0,
    resize: Resize = "none",
    teacher_output: OutputSelector = None,
    student_output: OutputSelector = None,
) -> DistillationWrapper:
    """Shu et al.'s channel-wise distillation on the logits (:class:`~segdistill.CWDLoss`),
    with their temperature 4 and weight 3.

    Args:
        teacher: the trained teacher.
        student: the student.
        temperature: :math:`T > 0`.
        weight: the term's weight.
        resize: the grid rule; logits at other resolutions need ``'teacher'``
            or ``'student'``.
        teacher_output: how to find the teacher's logits (see
            :func:`~segdistill.hooks.select_output`).
        student_output: how to find the student's logits.

    Returns:
        The wrapper, with the term ``'cwd'``.
    """
    term = DistillationTerm(CWDLoss(temperature=temperature), student=OUTPUT, teacher=OUTPUT,
                            weight=weight, resize=resize)
    return DistillationWrapper(teacher, student, {"cwd": term}, teacher_output=teacher_output,
                               student_output=student_output)
