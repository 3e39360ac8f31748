"""DistillationWrapper: distil your own teacher into your own student."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol, TypeAlias, cast, runtime_checkable

import torch
from torch import Tensor, nn

from segdistill._checks import check_real
from segdistill._distributed import plain_copy, student_wrapper_kind
from segdistill.feature_spec import FeatureLike, FeatureSpec
from segdistill.hooks import (
    FeatureHooks,
    OutputSelector,
    call_model,
    captured,
    check_map,
    image_size,
    select_output,
    take_feature,
    unwrap_model,
)
from segdistill.losses.holistic import attach_discriminator_loss

__all__ = ["OUTPUT", "AdversarialLoss", "DistillationOutput", "DistillationTerm",
           "DistillationWrapper", "InputFn"]

InputFn: TypeAlias = Callable[[Any], Any]
"""How one side's input is made from the batch (``teacher_input=``, ``student_input=``)."""

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
        teacher_input: makes the teacher's input from the batch given to
            :meth:`forward` (its dtype, normalisation or resolution, e.g.
            ``lambda x: x.to(torch.bfloat16)``, or ``lambda b: {"pixel_values":
            b["teacher_pixels"]}``); ``None`` gives it the batch as is.
        student_input: the same for the student. Either side's input may be a
            mapping, which the model is called with as keyword arguments
            (``model(**batch)``, as Hugging Face models take ``pixel_values=``).
        save_frozen: keep the teacher and the teacher-side transforms in
            :meth:`state_dict`. By default it holds only what is trained (the
            student, the adapters, the losses' parameters and any discriminator):
            the frozen parts are the ones given to the constructor, so a state
            saved without them loads back into a wrapper built the same way. With
            ``save_frozen``, a transform that two terms share (the paper's
            translator) is stored once, under its first name (safetensors refuses
            tensors stored twice).

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
        teacher_input: InputFn | None = None,
        student_input: InputFn | None = None,
        save_frozen: bool = False,
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
        for side, make in (("teacher_input", teacher_input), ("student_input", student_input)):
            if make is not None and not callable(make):
                raise TypeError(f"expected {side} to be None or a callable that makes that "
                                f"side's input from the batch, got {type(make).__name__}")
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
        self.teacher_input = teacher_input
        self.student_input = student_input
        self.save_frozen = bool(save_frozen)
        self._teacher_hooks = FeatureHooks(teacher, teacher_layers, "teacher")
        self._student_hooks = FeatureHooks(student, student_layers, "student")
        for hooks in (self._teacher_hooks, self._student_hooks):
            hooks.active = False  # on only inside this wrapper's forward
        _freeze(self.teacher)
        for module in self._frozen_transforms():
            _freeze(module)
        self.register_state_dict_post_hook(_DropFrozen())  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_RestoreFrozen())  # type: ignore[no-untyped-call]

    @property
    def teacher_layers(self) -> dict[str, FeatureSpec]:
        """The teacher's captured layers, ``{feature name: FeatureSpec}``."""
        return dict(self._teacher_hooks.specs)

    @property
    def student_layers(self) -> dict[str, FeatureSpec]:
        """The student's captured layers, ``{feature name: FeatureSpec}``."""
        return dict(self._student_hooks.specs)

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
        compiled (``torch.compile``), DDP-wrapped or FSDP2-sharded (``fully_shard``)
        student is unwrapped: the copy is the user's own module class with full,
        plain tensors, and its ``state_dict`` keys carry no ``_orig_mod.`` or
        ``module.`` prefix. With FSDP2 it gathers the shards: call it on every rank.
        """
        with self._student_hooks.detached():
            return plain_copy(self.student)

    def remove_hooks(self) -> None:
        """Unregister the wrapper's hooks from both models (the wrapper stops working)."""
        self._teacher_hooks.remove()
        self._student_hooks.remove()

    # ---- the step ----------------------------------------------------------------------

    def forward(self, inputs: Any, target: Tensor | None = None, *,
                teacher_features: Mapping[str, Tensor] | None = None) -> DistillationOutput:
        """Run the teacher (no gradients) and the student; evaluate every term.

        Args:
            inputs: the batch: what both models take (an image batch, or a mapping
                such as ``{"pixel_values": x}``, passed as keyword arguments), or
                what ``teacher_input``/``student_input`` make each side's input from.
            target: labels, passed to the terms that use them (KD's ignore mask).
            teacher_features: the teacher's features for this batch, computed
                before by :meth:`run_teacher` (a cache): the teacher does not run.
                Valid only for the very same input images (see the wrapper guide:
                a cache of un-augmented images is wrong for flipped or cropped ones).

        Raises:
            ValueError: a captured feature is not a tensor (a structured output
                without a selector), is not 4-D, or has other channels than its
                FeatureSpec declares; ``teacher_features`` lacks a feature or has
                one no term reads; the student is wrapped by DDP or FSDP while the
                wrapper trains parts outside it; a term's loss rejects its inputs
                (grids that do not fit under its ``resize``, labels outside the one
                label rule): the message starts with the term's name.
            RuntimeError: a layer ran more than once (choose a call in its spec),
                was written in place after capture in a way the first step did not
                show, or, on the student's side, ran with gradients disabled
                (``torch.utils.checkpoint(use_reentrant=True)``) while the step
                needs its gradient.
        """
        self._check_distributed()
        if teacher_features is None:
            teacher_feats = self.run_teacher(inputs)
        else:
            teacher_feats = self._cached(teacher_features)
        student_in = self.student_input(inputs) if self.student_input is not None else inputs
        hooks = self._student_hooks
        try:
            with hooks.capturing():
                student_out = call_model(self.student, student_in)
            student_feats = self._captured(hooks, student_out, self.student_output,
                                           "student", image_size(student_in))
            self._check_graph(student_feats)
            losses = self._evaluate_terms(student_feats, teacher_feats, target, student_in)
        finally:
            hooks.clear()  # a step that raised must not keep activations alive either
        values = list(losses.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return DistillationOutput(student_out, losses, total)

    @torch.no_grad()
    def run_teacher(self, inputs: Any) -> dict[str, Tensor]:
        """The teacher's features for a batch, as :meth:`forward` reads them (and its
        logits under ``'output'`` when a term uses them).

        Store them to pass as ``forward(..., teacher_features=...)`` later: the teacher
        then does not run. Tokens are already on their grid; teacher-side transforms
        are not applied (they run in the step, as without a cache).

        Args:
            inputs: the batch, as :meth:`forward` takes it.

        Returns:
            ``{feature name: tensor}``, detached.
        """
        teacher_in = self.teacher_input(inputs) if self.teacher_input is not None else inputs
        hooks = self._teacher_hooks
        try:
            with hooks.capturing():
                teacher_out = call_model(self.teacher, teacher_in)
            return self._captured(hooks, teacher_out, self.teacher_output, "teacher",
                                  image_size(teacher_in))
        finally:
            hooks.clear()

    def _teacher_names(self) -> set[str]:
        return {term.teacher for _, term in self._terms()}

    def _cached(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check a cache of the teacher's features against what the terms read."""
        if not isinstance(features, Mapping):
            raise TypeError(f"expected teacher_features as a mapping {{name: tensor}} (what "
                            f"run_teacher returns), got {type(features).__name__}")
        wanted, given = self._teacher_names(), set(features)
        if wanted - given or given - wanted:
            raise ValueError(
                f"teacher_features must hold exactly the teacher features the terms read, "
                f"{sorted(wanted)}; missing {sorted(wanted - given)}, unknown "
                f"{sorted(given - wanted)} (run_teacher returns the right ones)")
        for name, value in features.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"expected teacher_features[{name!r}] to be a tensor, got "
                                f"{type(value).__name__}")
        return {name: value.detach() for name, value in features.items()}

    def _captured(self, hooks: FeatureHooks, output: Any, selector: OutputSelector,
                  side: str, size: tuple[int, int] | None) -> dict[str, Tensor]:
        """One side's captured features and, when a term uses them, its logits."""
        features = hooks.pop(size)
        if any(getattr(term, side) == OUTPUT for _, term in self._terms()):
            features[OUTPUT] = select_output(output, selector, f"the {side}'s output")
        return features

    def _check_graph(self, features: dict[str, Tensor]) -> None:
        """A student map captured with gradients disabled gives the student no gradient:
        refuse it when this step needs one (the reentrant checkpoint's first pass)."""
        if not torch.is_grad_enabled():
            return
        for name in self._student_hooks.without_grad & set(features):
            raise RuntimeError(
                f"{self._student_hooks.what(name)} ran with gradients disabled, so its map "
                "carries no gradient and the distillation loss would not train the student "
                "(its value would look normal). This is what "
                "torch.utils.checkpoint(..., use_reentrant=True) does in its first pass; use "
                "use_reentrant=False (non-reentrant checkpointing keeps the graph), or "
                "capture a layer outside the checkpointed block")

    def _check_distributed(self) -> None:
        """Refuse a DDP/FSDP student when the wrapper trains parts outside it: their
        gradients would never be all-reduced (the ranks drift apart, silently)."""
        kind = student_wrapper_kind(self.student)
        if kind is None or _is_fsdp_root(self):
            return
        student = {id(p) for p in self.student.parameters()}
        outside = [p for p in (*self.trainable_parameters(),
                               *self.separately_optimized_parameters())
                   if id(p) not in student]
        if outside:
            raise ValueError(
                f"the student is wrapped by {kind}, but the wrapper trains "
                f"{sum(p.numel() for p in outside):,} values outside it (adapters, regressors, "
                "loss parameters or a discriminator), whose gradients that wrapper would "
                "never all-reduce: put DDP or FSDP around the wrapper instead, e.g. "
                "DistributedDataParallel(wrapper) or fully_shard(wrapper), and give it the "
                "plain student (see the wrapper guide, distributed training)")

    def _evaluate_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor],
        target: Tensor | None, inputs: Any,
    ) -> dict[str, Tensor]:
        transformed: dict[tuple[str, int], Tensor] = {}
        losses: dict[str, Tensor] = {}
        images = inputs.get("pixel_values") if isinstance(inputs, Mapping) else inputs
        for name, term in self._terms():
            t = self._teacher_feature(teacher_feats, term, transformed)
            s = self._student_feature(student_feats, term.student)
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"term {name!r}: the student's batch has {s.shape[0]} "
                                 f"images but the teacher's {t.shape[0]}")
            if term.student_adapter is not None:
                s = term.student_adapter(s)
            if s.dtype != t.dtype and s.is_floating_point() and t.is_floating_point():
                # a bf16 teacher beside an fp32 student: compare in the wider type
                wide = torch.promote_types(s.dtype, t.dtype)
                s, t = s.to(wide), t.to(wide)
            args = (s, t, target) if term.uses_target else (s, t)
            kwargs = {"images": images} if term.uses_inputs else {}
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

    def _teacher_feature(self, features: dict[str, Tensor], term: DistillationTerm,
                         transformed: dict[tuple[str, int], Tensor]) -> Tensor:
        """The teacher's feature for ``term``, through its transform, then checked 4-D (a
        transform may turn tokens into a map)."""
        name, transform = term.teacher, term.teacher_transform
        what = "the teacher's output" if name == OUTPUT else self._teacher_hooks.what(name)
        t = captured(features, name, what)
        if name != OUTPUT and t.ndim == 4:
            _check_channels(t, self._teacher_hooks.specs[name], what)
        if transform is not None:
            # terms sharing a transform (the paper's two terms share the translator's
            # encoder) compute it once per step
            key = (name, id(transform))
            if key not in transformed:
                with torch.no_grad():
                    transformed[key] = transform(t)
            t, what = transformed[key], f"{what} after its teacher_transform"
        return check_map(t, what)

    def _student_feature(self, features: dict[str, Tensor], name: str) -> Tensor:
        """The student's feature ``name`` (or its output), checked against its spec."""
        if name == OUTPUT:
            return take_feature(features, name, "the student's output")
        what = self._student_hooks.what(name)
        x = take_feature(features, name, what)
        _check_channels(x, self._student_hooks.specs[name], what)
        return x


def _is_fsdp_root(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module`` itself (and so every parameter
    in it, adapters included)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def _frozen_prefixes(wrapper: DistillationWrapper, aliases_only: bool = False) -> list[str]:
    """The state-dict prefixes of the wrapper's frozen parts: the teacher and each
    teacher-side transform, under every name it has (``aliases_only``: every name but
    its first, so that a transform two terms share is stored once)."""
    frozen = {id(wrapper.teacher)} | {id(m) for m in wrapper._frozen_transforms()}
    seen: set[int] = set()
    prefixes = []
    for name, module in wrapper.named_modules(remove_duplicate=False):
        if id(module) not in frozen:
            continue
        if aliases_only and id(module) not in seen:
            seen.add(id(module))
            continue
        prefixes.append(f"{name}.")
    return prefixes


class _DropFrozen:
    """State-dict post-hook: leave the frozen parts out (with ``save_frozen``, keep each
    under its first name only)."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 local_metadata: Any) -> None:
        wrapper = cast(DistillationWrapper, module)
        prefixes = tuple(prefix + p for p in _frozen_prefixes(wrapper, wrapper.save_frozen))
        for key in [k for k in state_dict if k.startswith(prefixes)]:
            del state_dict[key]


class _RestoreFrozen:
    """Load pre-hook: a state without the frozen parts loads strictly, keeping the frozen
    parts the wrapper was built with (their entries are filled in from the wrapper)."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 local_metadata: Any, strict: bool, missing_keys: list[str],
                 unexpected_keys: list[str], error_msgs: list[str]) -> None:
        wrapper = cast(DistillationWrapper, module)
        for part in _frozen_prefixes(wrapper):
            owner = wrapper.get_submodule(part[:-1])
            for key, value in owner.state_dict(keep_vars=True).items():
                state_dict.setdefault(prefix + part + key, value.detach())
