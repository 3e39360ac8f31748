"""DistillationWrapper: distil your own teacher into your own student."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segdistill._checks import check_choice, check_positive_int, check_real
from segdistill._features import RESIZE_MODES, Resize
from segdistill.adapter import Adapter
from segdistill.hooks import FeatureHooks, select_output
from segdistill.losses.adaptation import AdaptationLoss
from segdistill.losses.affinity import AffinityLoss
from segdistill.losses.attention import AttentionTransferLoss
from segdistill.losses.cwd import CWDLoss
from segdistill.losses.fitnet import FitNetLoss
from segdistill.losses.kd import KDLoss
from segdistill.losses.pairwise import PairwiseLoss
from segdistill.translator import Translator

__all__ = ["OUTPUT", "DistillationOutput", "DistillationTerm", "DistillationWrapper"]

OUTPUT = "output"
"""The feature name that stands for a model's output (its logits) in a term."""


class DistillationOutput(NamedTuple):
    """What :meth:`DistillationWrapper.forward` returns."""

    output: Any
    """The student's output, exactly as the student returned it."""
    losses: dict[str, Tensor]
    """Each term's loss, already multiplied by its weight, by term name."""
    loss: Tensor
    """The sum of :attr:`losses`: add the task loss and call ``backward``."""


def _align_grids(
    student: Tensor, teacher: Tensor, resize: str, term: str
) -> tuple[Tensor, Tensor]:
    """Put a student and a teacher map on one H x W grid, by a fixed rule.

    - Equal grids pass through.
    - With ``resize='student'`` (``'teacher'``) the teacher's (student's) map is
      resized bilinearly onto the other's grid, whatever the sizes.
    - Otherwise grids that differ by at most one cell per dimension are taken
      to differ by stride rounding (a 513 x 513 input gives 65 x 65 at output
      stride 8 and 33 x 33 at 16; ``ceil(65 / 2) = 33``, but a floor-rounding
      network gives 32) and the teacher's map is resized onto the student's
      grid with ``align_corners=True``, which keeps the corner cells aligned.
    - Any larger difference is a configuration error and raises.
    """
    s_size, t_size = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
    if s_size == t_size:
        return student, teacher
    if resize == "teacher":
        return F.interpolate(student, size=t_size, mode="bilinear", align_corners=False), teacher
    if resize == "student":
        return student, F.interpolate(teacher, size=s_size, mode="bilinear", align_corners=False)
    if all(abs(s - t) <= 1 for s, t in zip(s_size, t_size, strict=True)):
        return student, F.interpolate(teacher, size=s_size, mode="bilinear", align_corners=True)
    ratio = max(t / s for s, t in zip(s_size, t_size, strict=True))
    raise ValueError(
        f"term {term!r}: student features on a {s_size[0]} x {s_size[1]} grid but teacher "
        f"features on {t_size[0]} x {t_size[1]} (about {ratio:.3g}x); grids may differ by one "
        "cell of stride rounding at most. Hook layers at matching output strides (a stride-2 "
        "translator encoder maps OS 8 onto OS 16), or pass resize='student' or 'teacher' to "
        "interpolate"
    )


def _feature(features: Mapping[str, Any], name: str, side: str, key: str | int | None) -> Tensor:
    """Fetch one captured feature and check that it is a 4-D floating tensor."""
    what = f"the {side}'s output" if name == OUTPUT else f"the {side}'s feature {name!r}"
    if name not in features:
        raise RuntimeError(f"{what} was not captured: did the {side}'s forward run that module?")
    x = select_output(features[name], key if name == OUTPUT else None, what)
    if x.ndim != 4:
        raise ValueError(
            f"expected {what} to be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected {what} to be floating point, got {x.dtype}")
    return x


class DistillationTerm(nn.Module):
    """One weighted loss between a student feature and a teacher feature.

    The student's feature passes through ``student_adapter`` (trained with the
    student), the teacher's through ``teacher_transform`` (frozen, run without
    gradients, e.g. a trained :class:`~segdistill.Translator`'s encoder), then
    ``loss(student, teacher[, target])`` is multiplied by ``weight``.

    Args:
        loss: a loss module called as ``loss(student, teacher)``, or as
            ``loss(student, teacher, target)`` when ``uses_target``.
        student: the name of a captured student feature, or ``'output'``.
        teacher: the name of a captured teacher feature, or ``'output'``.
        weight: the term's weight, at least 0.
        student_adapter: a trainable module applied to the student's feature.
        teacher_transform: a frozen module applied to the teacher's feature.
        align: put the two maps on one grid first (see ``resize``); terms whose
            loss resizes by its own definition (KD, FitNet) set this to False.
        resize: ``'none'`` accepts grids that differ by stride rounding only
            and raises for a real mismatch; ``'student'`` or ``'teacher'``
            interpolates one map onto the other's grid.
        uses_target: pass the labels given to the wrapper on to the loss.

    Example:
        >>> term = DistillationTerm(AffinityLoss(), student="feat", teacher="feat")
        >>> term  # doctest: +ELLIPSIS
        DistillationTerm(
          student='feat', teacher='feat', weight=1.0, resize='none'
          (loss): AffinityLoss(distance='l2', method='auto', ...)
        )
    """

    def __init__(
        self,
        loss: nn.Module,
        *,
        student: str,
        teacher: str,
        weight: float = 1.0,
        student_adapter: nn.Module | None = None,
        teacher_transform: nn.Module | None = None,
        align: bool = True,
        resize: Resize = "none",
        uses_target: bool = False,
    ) -> None:
        super().__init__()
        for name, module in (("loss", loss), ("student_adapter", student_adapter),
                             ("teacher_transform", teacher_transform)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"expected {name} to be an nn.Module, got {type(module).__name__}")
        for name, feature in (("student", student), ("teacher", teacher)):
            if not isinstance(feature, str):
                raise TypeError(f"expected {name} to be a feature name (str), got "
                                f"{type(feature).__name__}")
        check_choice("resize", resize, RESIZE_MODES)
        self.loss = loss
        self.student = student
        self.teacher = teacher
        self.weight = check_real("weight", weight, minimum=0.0)
        self.student_adapter = student_adapter
        self.teacher_transform = teacher_transform
        self.align = bool(align)
        self.resize: Resize = resize
        self.uses_target = bool(uses_target)

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, weight={self.weight}, "
            f"resize={self.resize!r}"
        )


class _Encoder(nn.Module):
    """A translator's encoder as a teacher transform, with the translator's input check."""

    def __init__(self, translator: Translator) -> None:
        super().__init__()
        self.translator = translator

    def forward(self, x: Tensor) -> Tensor:
        return self.translator.encode(x)


def _freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class DistillationWrapper(nn.Module):
    r"""Wrap a teacher and a student; return the student's output and weighted losses.

    The wrapper captures the features each :class:`DistillationTerm` needs by
    dotted module path (forward hooks; any eager model), runs the frozen
    teacher without gradients, runs the student, and evaluates every term. The
    teacher and every term's ``teacher_transform`` are frozen: eval mode,
    ``requires_grad=False``, and :meth:`train` never switches them back.

    Presets: :meth:`knowledge_adaptation` (He et al., CVPR 2019), and the
    baselines :meth:`kd` (Hinton et al., 2015), :meth:`fitnet` (Romero et al.,
    2015), :meth:`attention_transfer` (Zagoruyko and Komodakis, 2017),
    :meth:`pairwise` (Liu et al., 2019) and :meth:`cwd` (Shu et al., 2021).

    Args:
        teacher: the trained teacher.
        student: the student to train.
        terms: ``{name: DistillationTerm}``.
        teacher_layers: ``{feature name: dotted module path}`` in the teacher.
        student_layers: ``{feature name: dotted module path}`` in the student.
        output_key: which entry of a model output that is a mapping or a
            sequence holds the logits, for terms on ``'output'``; ``'out'`` for
            a mapping (torchvision segmentation models) and the first element
            of a sequence by default.

    Raises:
        TypeError: the teacher, the student or a term is not an ``nn.Module``.
        ValueError: a module path does not exist (the message lists the closest
            valid ones), a term names a feature that no layer captures, the
            teacher is the student, or there are no terms.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
        >>> wrapper = DistillationWrapper(
        ...     teacher, student,
        ...     terms={"affinity": DistillationTerm(AffinityLoss(), student="f", teacher="f")},
        ...     teacher_layers={"f": "1"}, student_layers={"f": "1"},
        ... )
        >>> out = wrapper(torch.randn(2, 3, 8, 8))
        >>> out.output.shape, sorted(out.losses), out.loss.requires_grad
        (torch.Size([2, 5, 8, 8]), ['affinity'], True)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        terms: Mapping[str, DistillationTerm],
        teacher_layers: Mapping[str, str] | None = None,
        student_layers: Mapping[str, str] | None = None,
        output_key: str | int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("teacher", teacher), ("student", student)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"expected the {name} to be an nn.Module, got "
                                f"{type(value).__name__}")
        if teacher is student:
            raise ValueError("the teacher and the student are the same module")
        if not isinstance(terms, Mapping) or not terms:
            raise ValueError("expected at least one term, as {name: DistillationTerm}")
        for name, term in terms.items():
            if not isinstance(term, DistillationTerm):
                raise TypeError(f"expected term {name!r} to be a DistillationTerm, got "
                                f"{type(term).__name__}")
        teacher_layers = dict(teacher_layers or {})
        student_layers = dict(student_layers or {})
        for side, layers, attr in (("teacher", teacher_layers, "teacher"),
                                   ("student", student_layers, "student")):
            if OUTPUT in layers:
                raise ValueError(f"{OUTPUT!r} is reserved for the model's output; rename that "
                                 f"{side} layer")
            for name, term in terms.items():
                wanted = getattr(term, attr)
                if wanted != OUTPUT and wanted not in layers:
                    raise ValueError(
                        f"term {name!r} uses the {side} feature {wanted!r}, but the {side} "
                        f"layers capture only {sorted(layers)} (and {OUTPUT!r})"
                    )

        self.teacher = teacher
        self.student = student
        self.terms = nn.ModuleDict(dict(terms))
        self.output_key = output_key
        self._teacher_hooks = FeatureHooks(teacher, teacher_layers)
        self._student_hooks = FeatureHooks(student, student_layers)
        _freeze(self.teacher)
        for module in self._frozen_transforms():
            _freeze(module)

    # ---- frozen parts ------------------------------------------------------------------

    def _terms(self) -> Iterator[tuple[str, DistillationTerm]]:
        for name, term in self.terms.items():
            yield name, cast(DistillationTerm, term)

    def _frozen_transforms(self) -> Iterator[nn.Module]:
        for _, term in self._terms():
            if term.teacher_transform is not None:
                yield term.teacher_transform

    def train(self, mode: bool = True) -> DistillationWrapper:
        """Set the student and the adapters to ``mode``; the teacher side stays in eval."""
        super().train(mode)
        self.teacher.eval()
        for module in self._frozen_transforms():
            module.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimiser gets: the student's parameters, the adapters' and the losses'.

        The teacher and the teacher-side transforms are excluded, and so is any
        parameter the user froze (``requires_grad=False``).
        """
        seen: set[int] = set()
        frozen = {id(p) for m in self._frozen_transforms() for p in m.parameters()}
        modules: list[nn.Module] = [self.student]
        for _, term in self._terms():
            modules.append(term.loss)
            if term.student_adapter is not None:
                modules.append(term.student_adapter)
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen and id(p) not in frozen:
                    seen.add(id(p))
                    yield p

    def export_student(self) -> nn.Module:
        """A copy of the plain student, with no hooks and no adapters, for deployment.

        Its parameters, buffers and FLOPs are exactly the student's own: the
        adapters and losses live beside it in the wrapper, not inside it.
        """
        with self._student_hooks.detached():
            return copy.deepcopy(self.student)

    def remove_hooks(self) -> None:
        """Unregister the wrapper's hooks from both models (the wrapper stops working)."""
        self._teacher_hooks.remove()
        self._student_hooks.remove()

    # ---- the step ----------------------------------------------------------------------

    def forward(self, inputs: Any, target: Tensor | None = None) -> DistillationOutput:
        """Run the teacher (no gradients) and the student; evaluate every term.

        Args:
            inputs: what both models take (an image batch).
            target: labels, passed to the terms that use them (KD's ignore mask).
        """
        self._teacher_hooks.clear()
        self._student_hooks.clear()
        try:
            with torch.no_grad():
                teacher_out = self.teacher(inputs)
            teacher_feats = self._teacher_hooks.pop()
            teacher_feats[OUTPUT] = teacher_out
            student_out = self.student(inputs)
            student_feats = self._student_hooks.pop()
            student_feats[OUTPUT] = student_out
            losses = self._evaluate_terms(student_feats, teacher_feats, target)
        finally:
            # a step that raised must not keep activations alive either
            self._teacher_hooks.clear()
            self._student_hooks.clear()
        values = list(losses.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return DistillationOutput(student_out, losses, total)

    def _evaluate_terms(
        self, student_feats: dict[str, Any], teacher_feats: dict[str, Any], target: Tensor | None
    ) -> dict[str, Tensor]:
        transformed: dict[tuple[str, int], Tensor] = {}
        losses: dict[str, Tensor] = {}
        for name, term in self._terms():
            t = _feature(teacher_feats, term.teacher, "teacher", self.output_key)
            transform = term.teacher_transform
            if transform is not None:
                # terms sharing a transform (the paper's two terms share the
                # translator's encoder) compute it once per step
                key = (term.teacher, id(transform))
                if key not in transformed:
                    with torch.no_grad():
                        transformed[key] = transform(t)
                t = transformed[key]
            s = _feature(student_feats, term.student, "student", self.output_key)
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"term {name!r}: the student's batch has {s.shape[0]} "
                                 f"images but the teacher's {t.shape[0]}")
            if term.student_adapter is not None:
                s = term.student_adapter(s)
            if term.align:
                s, t = _align_grids(s, t, term.resize, name)
            args = (s, t, target) if term.uses_target else (s, t)
            losses[name] = term.weight * term.loss(*args)
        return losses

    # ---- presets -----------------------------------------------------------------------

    @classmethod
    def knowledge_adaptation(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        teacher_layer: str,
        student_layer: str,
        translator: Translator,
        student_channels: int,
        adaptation_weight: float = 50.0,
        affinity_weight: float = 1.0,
        adapter_layers: int = 3,
        resize: Resize = "none",
    ) -> DistillationWrapper:
        r"""The paper's method: adaptation and affinity through a trained translator.

        .. math::

            \mathcal{L} = \beta\,\mathcal{L}_{adapt}\big(C_f(\phi_s), E(\phi_t)\big)
                + \gamma\,\mathcal{L}_{aff}\big(C_a(\phi_s), E(\phi_t)\big),
            \quad \beta = 50,\ \gamma = 1

        (add the task's cross-entropy yourself). :math:`E` is the trained
        translator's encoder, frozen; :math:`C_f` and :math:`C_a` are two new
        :class:`~segdistill.Adapter`\ s trained with the student. A weight of
        0 leaves its term out altogether (no adapter, no cost), which is how
        the paper's ablations of each term alone are run.

        Args:
            teacher: the trained teacher.
            student: the student.
            teacher_layer: path of the teacher's last feature map :math:`\phi_t`.
            student_layer: path of the student's last feature map :math:`\phi_s`.
            translator: the translator trained on the teacher's features (stage 1).
            student_channels: :math:`C_s`, the channels at ``student_layer``.
            adaptation_weight: :math:`\beta`.
            affinity_weight: :math:`\gamma`.
            adapter_layers: conv layers per adapter (the paper's appendix: 3).
            resize: see :class:`DistillationTerm`.
        """
        if not isinstance(translator, Translator):
            raise TypeError(f"expected translator to be a segdistill.Translator, got "
                            f"{type(translator).__name__}")
        check_positive_int("student_channels", student_channels)
        latent = translator.latent_channels
        encoder = _Encoder(translator)
        losses: dict[str, tuple[nn.Module, float]] = {
            "adaptation": (AdaptationLoss(), adaptation_weight),
            "affinity": (AffinityLoss(), affinity_weight),
        }
        terms = {
            name: DistillationTerm(
                loss, student="features", teacher="features", weight=weight, resize=resize,
                student_adapter=Adapter(student_channels, latent, adapter_layers),
                teacher_transform=encoder,
            )
            for name, (loss, weight) in losses.items()
            if check_real(f"{name}_weight", weight, minimum=0.0) > 0
        }
        if not terms:
            raise ValueError("adaptation_weight and affinity_weight are both 0: nothing to distil")
        _freeze(translator)  # the decoder too: stage 2 uses the encoder only
        return cls(teacher, student, terms, {"features": teacher_layer},
                   {"features": student_layer})

    @classmethod
    def kd(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float = 4.0,
        weight: float = 1.0,
        ignore_index: int | None = 255,
        output_key: str | int | None = None,
    ) -> DistillationWrapper:
        """Hinton et al.'s knowledge distillation on the models' logits, pixel-wise
        (:class:`~segdistill.KDLoss`).

        Pass the labels as ``target`` to the wrapper to leave out the pixels
        labelled ``ignore_index``.
        """
        term = DistillationTerm(
            KDLoss(temperature=temperature, ignore_index=ignore_index),
            student=OUTPUT, teacher=OUTPUT, weight=weight, align=False, uses_target=True,
        )
        return cls(teacher, student, {"kd": term}, output_key=output_key)

    @classmethod
    def fitnet(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        teacher_layer: str,
        student_layer: str,
        student_channels: int,
        teacher_channels: int,
        weight: float = 1.0,
    ) -> DistillationWrapper:
        """Romero et al.'s FitNet hint (:class:`~segdistill.FitNetLoss`): student features
        through a 1x1 regressor, upsampled to the teacher's grid, L2."""
        term = DistillationTerm(
            FitNetLoss(student_channels, teacher_channels), student="features",
            teacher="features", weight=weight, align=False,
        )
        return cls(teacher, student, {"fitnet": term}, {"features": teacher_layer},
                   {"features": student_layer})

    @classmethod
    def attention_transfer(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        teacher_layer: str,
        student_layer: str,
        weight: float = 1000.0,
        resize: Resize = "teacher",
    ) -> DistillationWrapper:
        """Zagoruyko and Komodakis's attention transfer
        (:class:`~segdistill.AttentionTransferLoss`), with their weight of 1000.

        The student's map is resized onto the teacher's grid by default.
        """
        term = DistillationTerm(AttentionTransferLoss(), student="features",
                                teacher="features", weight=weight, resize=resize)
        return cls(teacher, student, {"attention": term}, {"features": teacher_layer},
                   {"features": student_layer})

    @classmethod
    def pairwise(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        teacher_layer: str,
        student_layer: str,
        weight: float = 1.0,
        patch_size: int | tuple[int, int] | None = None,
        resize: Resize = "none",
    ) -> DistillationWrapper:
        """Liu et al.'s pair-wise similarity distillation (:class:`~segdistill.PairwiseLoss`),
        memory-linear, with optional patch pooling."""
        term = DistillationTerm(PairwiseLoss(patch_size=patch_size), student="features",
                                teacher="features", weight=weight, resize=resize)
        return cls(teacher, student, {"pairwise": term}, {"features": teacher_layer},
                   {"features": student_layer})

    @classmethod
    def cwd(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float = 4.0,
        weight: float = 3.0,
        output_key: str | int | None = None,
        resize: Resize = "teacher",
    ) -> DistillationWrapper:
        """Shu et al.'s channel-wise distillation on the logits (:class:`~segdistill.CWDLoss`),
        with their temperature 4 and weight 3; the student's logits are resized onto the
        teacher's grid by default."""
        term = DistillationTerm(CWDLoss(temperature=temperature), student=OUTPUT,
                                teacher=OUTPUT, weight=weight, resize=resize)
        return cls(teacher, student, {"cwd": term}, output_key=output_key)
