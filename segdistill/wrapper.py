"""DistillationWrapper: distil your own teacher into your own student."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from segdistill._checks import check_choice, check_positive_int, check_real
from segdistill._features import RESIZE_MODES, Resize, align_grids
from segdistill.hooks import FeatureHooks, OutputSelector, select_output, take_feature, unwrap_model

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


def _check_output_selector(name: str, selector: Any) -> None:
    if selector is None or callable(selector) or (
        isinstance(selector, (str, int)) and not isinstance(selector, bool)
    ):
        return
    raise TypeError(f"expected {name} to be None, a key (str), an index (int) or a callable "
                    f"returning the logits, got {type(selector).__name__}")


def _check_channels(x: Tensor, expected: int | None, term: str, side: str, what: str) -> None:
    """A term built for ``expected`` channels names the argument that fixes a mismatch."""
    got = x.shape[1]
    if expected is None or got == expected:
        return
    if side == "student":
        fix = (f"pass student_channels={got} (or example_input= to read it), or a "
               f"student_layer with {expected} channels")
    else:
        fix = (f"pass the teacher_layer with {expected} channels (a translator works on the "
               f"layer it was trained on), or teacher_channels={got}")
    raise ValueError(f"term {term!r}: {what} has {got} channels but the term was built for "
                     f"{expected}; {fix}")


def _check_labels(target: Any, logits: Tensor, ignore_index: int | None, term: str,
                  resize: str) -> None:
    """Labels a term masks with: (B, H, W) integers on the logits' grid, in [0, classes)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"term {term!r}: expected the labels (target) to be a tensor, got "
                        f"{type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"term {term!r}: expected integer labels, got {target.dtype}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"term {term!r}: expected labels of shape (B, H, W) with B = "
                         f"{logits.shape[0]}, got shape {tuple(target.shape)}")
    if target.shape[-2:] != logits.shape[-2:]:
        h, w = logits.shape[-2:]
        raise ValueError(
            f"term {term!r}: labels on a {target.shape[-2]} x {target.shape[-1]} grid but the "
            f"logits they mask are {h} x {w} (after resize={resize!r}); pass labels of that "
            "size, or resize='student' or resize='teacher' to put the logits on the labels' grid"
        )
    classes = logits.shape[1]
    counted = target if ignore_index is None else target[target != ignore_index]
    if counted.numel() and bool(((counted < 0) | (counted >= classes)).any()):
        allowed = f"[0, {classes})" + ("" if ignore_index is None
                                       else f" or ignore_index={ignore_index}")
        raise ValueError(f"term {term!r}: labels must be in {allowed}, got values from "
                         f"{int(counted.min())} to {int(counted.max())}")


class DistillationTerm(nn.Module):
    """One weighted loss between a student feature and a teacher feature.

    The student's feature passes through ``student_adapter`` (trained with the
    student), the teacher's through ``teacher_transform`` (frozen, run without
    gradients, e.g. a trained :class:`~segdistill.Translator`'s encoder); the
    two maps are put on one grid by the library's one rule
    (:func:`~segdistill._features.align_grids`, see ``resize``), then
    ``loss(student, teacher[, target])`` is multiplied by ``weight``.

    Args:
        loss: a loss module called as ``loss(student, teacher)``, or as
            ``loss(student, teacher, target)`` when ``uses_target``.
        student: the name of a captured student feature, or ``'output'``.
        teacher: the name of a captured teacher feature, or ``'output'``.
        weight: the term's weight, at least 0.
        student_adapter: a trainable module applied to the student's feature.
        teacher_transform: a frozen module applied to the teacher's feature.
        resize: ``'none'`` (the default of every preset) aligns grids that
            differ by one cell of stride rounding and raises for a real
            mismatch; ``'student'`` or ``'teacher'`` interpolates one map onto
            the named side's grid.
        uses_target: pass the labels given to the wrapper on to the loss. They
            are checked first: (B, H, W) integers on the logits' grid after
            resizing, in ``[0, classes)`` or the loss's ``ignore_index``
            attribute, if it has one.
        student_channels: the channels the term was built for at its student
            feature (before the adapter), checked every step so that a
            mismatch names the argument to change; ``None`` skips the check.
        teacher_channels: the same for the teacher's feature (before the transform).

    Raises:
        TypeError: ``loss``, ``student_adapter`` or ``teacher_transform`` is not
            an ``nn.Module``; a feature name is not a string.
        ValueError: a negative weight, an unknown ``resize``, a channel count below 1.

    Example:
        >>> from segdistill import AffinityLoss
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
        resize: Resize = "none",
        uses_target: bool = False,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
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
        self.resize: Resize = resize
        self.uses_target = bool(uses_target)
        self.student_channels = (None if student_channels is None
                                 else check_positive_int("student_channels", student_channels))
        self.teacher_channels = (None if teacher_channels is None
                                 else check_positive_int("teacher_channels", teacher_channels))

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, weight={self.weight}, "
            f"resize={self.resize!r}"
        )


def _freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class DistillationWrapper(nn.Module):
    r"""Wrap a teacher and a student; return the student's output and weighted losses.

    The wrapper captures the features each :class:`DistillationTerm` needs by
    layer path (forward hooks; any eager, compiled or DDP-wrapped model), runs
    the frozen teacher without gradients, runs the student, and evaluates
    every term. The teacher and every term's ``teacher_transform`` are frozen:
    eval mode, ``requires_grad=False``, and :meth:`train` never switches them
    back.

    A layer path is a dotted module path, followed by Python indexing for a
    module that returns a list, a tuple or a mapping: ``'encoder[-1]'``,
    ``"backbone['high']"``. A module whose output is not a tensor must be
    given a selector (the first step raises and shows what it returns).

    Presets, in :mod:`segdistill.presets` and as static methods here:
    :meth:`knowledge_adaptation` (He et al., CVPR 2019), and the baselines
    :meth:`kd` (Hinton et al., 2015), :meth:`fitnet` (Romero et al., 2015),
    :meth:`attention_transfer` (Zagoruyko and Komodakis, 2017),
    :meth:`pairwise` (Liu et al., 2019) and :meth:`cwd` (Shu et al., 2021).

    Args:
        teacher: the trained teacher.
        student: the student to train.
        terms: ``{name: DistillationTerm}``.
        teacher_layers: ``{feature name: layer path}`` in the teacher.
        student_layers: ``{feature name: layer path}`` in the student.
        teacher_output: how to find the teacher's logits in its output, for
            terms on ``'output'`` (see :func:`~segdistill.hooks.select_output`):
            ``None`` takes a tensor, a mapping's ``'out'`` (torchvision) or
            ``logits`` (Hugging Face); or a key, an index, or a callable.
        student_output: the same for the student.

    Raises:
        TypeError: the teacher, the student or a term is not an ``nn.Module``;
            an output selector of the wrong type.
        ValueError: a module path does not exist (the message lists the closest
            valid ones), a selector is malformed, a term names a feature that
            no layer captures, the teacher is the student, or there are no terms.

    Example:
        >>> from segdistill import AffinityLoss
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
        *,
        teacher_output: OutputSelector = None,
        student_output: OutputSelector = None,
    ) -> None:
        super().__init__()
        for name, value in (("teacher", teacher), ("student", student)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"expected the {name} to be an nn.Module, got "
                                f"{type(value).__name__}")
        if unwrap_model(teacher) is unwrap_model(student):
            raise ValueError("the teacher and the student are the same module")
        if not isinstance(terms, Mapping) or not terms:
            raise ValueError("expected at least one term, as {name: DistillationTerm}")
        for name, term in terms.items():
            if not isinstance(term, DistillationTerm):
                raise TypeError(f"expected term {name!r} to be a DistillationTerm, got "
                                f"{type(term).__name__}")
        _check_output_selector("teacher_output", teacher_output)
        _check_output_selector("student_output", student_output)
        teacher_layers = dict(teacher_layers or {})
        student_layers = dict(student_layers or {})
        for side, layers in (("teacher", teacher_layers), ("student", student_layers)):
            if OUTPUT in layers:
                raise ValueError(f"{OUTPUT!r} is reserved for the model's output; rename that "
                                 f"{side} layer")
            for name, term in terms.items():
                wanted = getattr(term, side)
                if wanted != OUTPUT and wanted not in layers:
                    raise ValueError(
                        f"term {name!r} uses the {side} feature {wanted!r}, but the {side} "
                        f"layers capture only {sorted(layers)} (and {OUTPUT!r})"
                    )

        self.teacher = teacher
        self.student = student
        self.terms = nn.ModuleDict(dict(terms))
        self.teacher_output: OutputSelector = teacher_output
        self.student_output: OutputSelector = student_output
        self._teacher_hooks = FeatureHooks(teacher, teacher_layers, "teacher")
        self._student_hooks = FeatureHooks(student, student_layers, "student")
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
        adapters and losses live beside it in the wrapper, not inside it. A
        compiled (``torch.compile``) or DDP-wrapped student is unwrapped
        (:func:`~segdistill.hooks.unwrap_model`), so the copy's ``state_dict``
        keys carry no ``_orig_mod.`` or ``module.`` prefix.
        """
        with self._student_hooks.detached():
            return copy.deepcopy(unwrap_model(self.student))

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

        Raises:
            ValueError: a captured feature is not a tensor (a structured output
                without a selector), is not 4-D, has other channels than its term
                was built for, or sits on a grid that does not fit the other
                side's; labels that do not fit the logits they mask.
        """
        self._teacher_hooks.clear()
        self._student_hooks.clear()
        try:
            with torch.no_grad():
                teacher_out = self.teacher(inputs)
            teacher_feats = self._captured(self._teacher_hooks, teacher_out,
                                           self.teacher_output, "teacher")
            student_out = self.student(inputs)
            student_feats = self._captured(self._student_hooks, student_out,
                                           self.student_output, "student")
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

    def _captured(self, hooks: FeatureHooks, output: Any, selector: OutputSelector,
                  side: str) -> dict[str, Tensor]:
        """One side's captured features and, when a term uses them, its logits."""
        features = hooks.pop()
        if any(getattr(term, side) == OUTPUT for _, term in self._terms()):
            features[OUTPUT] = select_output(output, selector, f"the {side}'s output")
        return features

    def _what(self, side: str, name: str) -> str:
        if name == OUTPUT:
            return f"the {side}'s output"
        hooks = self._teacher_hooks if side == "teacher" else self._student_hooks
        return hooks.what(name)

    def _evaluate_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor],
        target: Tensor | None,
    ) -> dict[str, Tensor]:
        transformed: dict[tuple[str, int], Tensor] = {}
        losses: dict[str, Tensor] = {}
        for name, term in self._terms():
            what_t = self._what("teacher", term.teacher)
            t = take_feature(teacher_feats, term.teacher, what_t)
            _check_channels(t, term.teacher_channels, name, "teacher", what_t)
            transform = term.teacher_transform
            if transform is not None:
                # terms sharing a transform (the paper's two terms share the
                # translator's encoder) compute it once per step
                key = (term.teacher, id(transform))
                if key not in transformed:
                    with torch.no_grad():
                        transformed[key] = transform(t)
                t = transformed[key]
            what_s = self._what("student", term.student)
            s = take_feature(student_feats, term.student, what_s)
            _check_channels(s, term.student_channels, name, "student", what_s)
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"term {name!r}: the student's batch has {s.shape[0]} "
                                 f"images but the teacher's {t.shape[0]}")
            if term.student_adapter is not None:
                s = term.student_adapter(s)
            s, t = align_grids(s, t, term.resize, name)
            if term.uses_target and target is not None:
                _check_labels(target, t, getattr(term.loss, "ignore_index", None), name,
                              term.resize)
            args = (s, t, target) if term.uses_target else (s, t)
            losses[name] = term.weight * term.loss(*args)
        return losses

    # ---- presets (segdistill.presets; kept here so DistillationWrapper.kd(...) works) ---

    @staticmethod
    def knowledge_adaptation(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.knowledge_adaptation`: the paper's method."""
        from segdistill import presets

        return presets.knowledge_adaptation(*args, **kwargs)

    @staticmethod
    def kd(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.kd`: Hinton et al.'s KD on the logits."""
        from segdistill import presets

        return presets.kd(*args, **kwargs)

    @staticmethod
    def fitnet(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.fitnet`: Romero et al.'s FitNet hint."""
        from segdistill import presets

        return presets.fitnet(*args, **kwargs)

    @staticmethod
    def attention_transfer(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.attention_transfer`: Zagoruyko and Komodakis."""
        from segdistill import presets

        return presets.attention_transfer(*args, **kwargs)

    @staticmethod
    def pairwise(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.pairwise`: Liu et al.'s pair-wise similarity."""
        from segdistill import presets

        return presets.pairwise(*args, **kwargs)

    @staticmethod
    def cwd(*args: Any, **kwargs: Any) -> DistillationWrapper:
        """:func:`segdistill.presets.cwd`: Shu et al.'s channel-wise distillation."""
        from segdistill import presets

        return presets.cwd(*args, **kwargs)
