"""DistillationWrapper: distil your own teacher into your own student."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from segdistill._checks import check_real
from segdistill.feature_spec import FeatureLike, FeatureSpec
from segdistill.hooks import FeatureHooks, OutputSelector, select_output, take_feature, unwrap_model
from segdistill.losses.holistic import attach_discriminator_loss

__all__ = ["OUTPUT", "AdversarialLoss", "DistillationOutput", "DistillationTerm",
           "DistillationWrapper"]

OUTPUT = "output"
"""The feature name that stands for a model's output (its logits) in a term."""


@runtime_checkable
class AdversarialLoss(Protocol):
    """A term's loss that trains a network of its own (a discriminator) against the
    student, e.g. :class:`~segdistill.HolisticLoss`.

    Its parameters go to an optimiser of their own
    (:meth:`DistillationWrapper.separately_optimized_parameters`), never the student's;
    in a training step the wrapper attaches its ``discriminator_loss`` (called with the
    term's arguments) to the term's value, so the loop's one backward trains it too.
    """

    def separately_optimized_parameters(self) -> Iterator[nn.Parameter]: ...

    def discriminator_loss(self, *args: Any, **kwargs: Any) -> Tensor: ...


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


def _check_channels(x: Tensor, spec: FeatureSpec, what: str) -> None:
    """A captured map must have the channels its spec declares: the adapters, regressors
    and translators of the terms that read it were built for them."""
    got = x.shape[1]
    if spec.channels is None or got == spec.channels:
        return
    raise ValueError(
        f"{what} has {got} channels but its FeatureSpec says channels={spec.channels} (what "
        f"the terms reading it were built for); pass FeatureSpec({spec.layer!r}, "
        f"channels={got}) (or example_input= to a preset, to read it), or a layer with "
        f"{spec.channels} channels"
    )


class DistillationTerm(nn.Module):
    """One weighted loss between a student feature and a teacher feature.

    The student's feature passes through ``student_adapter`` (trained with the
    student), the teacher's through ``teacher_transform`` (frozen, run without
    gradients, e.g. a trained :class:`~segdistill.Translator`'s encoder); then
    ``loss(student, teacher[, target])`` is multiplied by ``weight``. The term
    does not resize anything: the loss owns the grid (every segdistill loss
    takes ``resize=``, :func:`~segdistill._features.align_grids` is its one
    rule), and the labels are handed to it as given (the loss applies the one
    label rule of :mod:`segdistill._labels`).

    Args:
        loss: a loss module called as ``loss(student, teacher)``, or as
            ``loss(student, teacher, target)`` when ``uses_target``.
        student: the name of a captured student feature, or ``'output'``.
        teacher: the name of a captured teacher feature, or ``'output'``.
        weight: the term's weight, at least 0.
        student_adapter: a trainable module applied to the student's feature.
        teacher_transform: a frozen module applied to the teacher's feature.
        uses_target: pass the labels given to the wrapper on to the loss, as
            ``loss(student, teacher, target)``.
        uses_inputs: pass the wrapper's inputs (the image batch) on to the loss,
            as the keyword ``images=`` (the conditional discriminator of
            :class:`~segdistill.HolisticLoss`).

    Raises:
        TypeError: ``loss``, ``student_adapter`` or ``teacher_transform`` is not
            an ``nn.Module``; a feature name is not a string.
        ValueError: a negative weight.

    Example:
        >>> from segdistill import AffinityLoss
        >>> term = DistillationTerm(AffinityLoss(), student="feat", teacher="feat")
        >>> term  # doctest: +ELLIPSIS
        DistillationTerm(
          student='feat', teacher='feat', weight=1.0
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
        uses_target: bool = False,
        uses_inputs: bool = False,
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
        self.loss = loss
        self.student = student
        self.teacher = teacher
        self.weight = check_real("weight", weight, minimum=0.0)
        self.student_adapter = student_adapter
        self.teacher_transform = teacher_transform
        self.uses_target = bool(uses_target)
        self.uses_inputs = bool(uses_inputs)

    def extra_repr(self) -> str:
        return f"student={self.student!r}, teacher={self.teacher!r}, weight={self.weight}"


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

    A layer is a layer path or a :class:`~segdistill.FeatureSpec`: a dotted
    module path, followed by Python indexing for a module that returns a
    list, a tuple or a mapping: ``'encoder[-1]'``, ``"backbone['high']"``. A
    module whose output is not a tensor must be given a selector (the first
    step raises and shows what it returns). A spec that declares its
    ``channels`` has every captured map checked against them.

    The presets build this wrapper for the paper's method and each baseline;
    they live in :mod:`segdistill.presets` (by name in
    :data:`segdistill.presets.PRESETS`), which imports this module, never
    the other way round.

    Args:
        teacher: the trained teacher.
        student: the student to train.
        terms: ``{name: DistillationTerm}``.
        teacher_layers: ``{feature name: layer path or FeatureSpec}`` in the teacher.
        student_layers: ``{feature name: layer path or FeatureSpec}`` in the student.
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
        teacher_layers: Mapping[str, FeatureLike] | None = None,
        student_layers: Mapping[str, FeatureLike] | None = None,
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
        parameter the user froze (``requires_grad=False``) and any that a term's
        :class:`AdversarialLoss` trains with an optimiser of its own
        (:meth:`separately_optimized_parameters`).
        """
        seen: set[int] = set()
        excluded = {id(p) for m in self._frozen_transforms() for p in m.parameters()}
        excluded |= {id(p) for p in self.separately_optimized_parameters()}  # their own optimiser
        modules: list[nn.Module] = [self.student]
        for _, term in self._terms():
            modules.append(term.loss)
            if term.student_adapter is not None:
                modules.append(term.student_adapter)
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen and id(p) not in excluded:
                    seen.add(id(p))
                    yield p

    def separately_optimized_parameters(self) -> Iterator[nn.Parameter]:
        """What a second optimiser gets: the parameters of the terms' adversaries (an
        :class:`AdversarialLoss`'s discriminator), which :meth:`trainable_parameters`
        leaves out. For :class:`~segdistill.HolisticLoss`, Adam at 4e-4 with betas
        (0.9, 0.99) (:func:`~segdistill.discriminator_optimizer`); step it with the
        student's optimiser, after the same backward."""
        seen: set[int] = set()
        for _, term in self._terms():
            if isinstance(term.loss, AdversarialLoss):
                for p in term.loss.separately_optimized_parameters():
                    if id(p) not in seen:
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
                without a selector), is not 4-D, or has other channels than its
                FeatureSpec declares; a term's loss rejects its inputs (grids
                that do not fit under its ``resize``, labels outside the one
                label rule): the message starts with the term's name.
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
            losses = self._evaluate_terms(student_feats, teacher_feats, target, inputs)
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

    def _evaluate_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor],
        target: Tensor | None, inputs: Any,
    ) -> dict[str, Tensor]:
        transformed: dict[tuple[str, int], Tensor] = {}
        losses: dict[str, Tensor] = {}
        for name, term in self._terms():
            t = self._feature("teacher", teacher_feats, term.teacher)
            transform = term.teacher_transform
            if transform is not None:
                # terms sharing a transform (the paper's two terms share the
                # translator's encoder) compute it once per step
                key = (term.teacher, id(transform))
                if key not in transformed:
                    with torch.no_grad():
                        transformed[key] = transform(t)
                t = transformed[key]
            s = self._feature("student", student_feats, term.student)
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"term {name!r}: the student's batch has {s.shape[0]} "
                                 f"images but the teacher's {t.shape[0]}")
            if term.student_adapter is not None:
                s = term.student_adapter(s)
            args = (s, t, target) if term.uses_target else (s, t)
            kwargs = {"images": inputs} if term.uses_inputs else {}
            try:
                value = term.weight * term.loss(*args, **kwargs)
                # an adversary trains in the same backward: its loss is attached with
                # value 0, so losses[name] and the loop's total stay the student's
                if (isinstance(term.loss, AdversarialLoss) and self.training
                        and torch.is_grad_enabled()):
                    value = attach_discriminator_loss(
                        value, term.loss.discriminator_loss(*args, **kwargs))
            except (TypeError, ValueError) as error:  # name the term the user configured
                raise type(error)(f"term {name!r}: {error}") from error
            losses[name] = value
        return losses

    def _feature(self, side: str, features: dict[str, Tensor], name: str) -> Tensor:
        """One side's feature ``name``, checked against its spec."""
        if name == OUTPUT:
            return take_feature(features, name, f"the {side}'s output")
        hooks = self._teacher_hooks if side == "teacher" else self._student_hooks
        x = take_feature(features, name, hooks.what(name))
        _check_channels(x, hooks.specs[name], hooks.what(name))
        return x
