"""Stage 1: train the knowledge translator on a frozen teacher's features."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segdistill._checks import check_positive_int, check_real
from segdistill.checkpoint import changed_settings, load_checkpoint, save_checkpoint
from segdistill.hooks import FeatureHooks, image_size, select_output, take_feature
from segdistill.losses.reconstruction import reconstruction_loss
from segdistill.translator import Translator

__all__ = ["TranslatorTraining", "TranslatorTrainingConfig", "train_translator"]


class TranslatorTraining(NamedTuple):
    """What :func:`train_translator` returns."""

    translator: Translator
    """The trained translator, in eval mode."""
    history: list[float]
    """The reconstruction loss of every step, in order."""


def _progress(items: Iterable[Any], enabled: bool, total: int | None) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is an optional extra
            return items
        return tqdm(items, total=total, desc="translator", unit="batch")
    return items


def _batches(loader: Iterable[Any], epochs: int) -> Iterator[Any]:
    for _ in range(epochs):
        yield from loader


@dataclass(frozen=True)
class TranslatorTrainingConfig:
    r"""How :func:`train_translator` trains; the defaults are the paper's settings.

    One epoch of SGD at a constant learning rate of 0.1, momentum 0.9, weight
    decay :math:`10^{-4}` and :math:`\alpha = 10^{-7}`. Every field is checked
    when the config is made.

    Raises:
        TypeError: a field of the wrong type (``epochs=1.5``, ``resume="yes"``).
        ValueError: a value out of range (a negative learning rate, no positive
            step count), an unknown device, or ``resume`` or ``checkpoint_every``
            without a ``checkpoint_path``.

    Example:
        >>> config = TranslatorTrainingConfig(epochs=2, progress=False)
        >>> config.lr, config.epochs
        (0.1, 2)
    """

    epochs: int = 1
    """Passes over the loader."""
    lr: float = 0.1
    """SGD learning rate (constant)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    alpha: float = 1e-7
    """Weight of the latent's L1 term in eq. (1)."""
    latent_channels: int | None = None
    """A new translator's code channels (default :math:`C_t`); ignored when
    :func:`train_translator` is given a translator."""
    max_steps: int | None = None
    """Stop after this many steps in all."""
    input_key: str | int | None = None
    """Which entry of a batch holds the images (default: the batch itself if it
    is a tensor, its first element if a sequence, ``'image'`` if a mapping)."""
    device: str | torch.device | None = None
    """Where to train; by default the teacher's device."""
    checkpoint_path: str | os.PathLike[str] | None = None
    """Write a checkpoint (atomically) there every ``checkpoint_every`` steps and
    at the end."""
    checkpoint_every: int | None = None
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from ``checkpoint_path`` if it exists: the translator, the
    optimiser, the step and the history are restored and the first batches,
    already seen, are skipped. With a shuffling ``DataLoader`` give it a seeded
    generator so the order repeats. The checkpoint records the settings the run
    was written with (:attr:`record`); a resume with other settings is refused."""
    record: Mapping[str, Any] | None = None
    """What else the checkpoint records and a resume compares, beside the
    optimisation fields (``lr``, ``momentum``, ``weight_decay``, ``alpha``,
    ``input_key``): the settings this function cannot see, such as the batch
    size, the data or the loader's seed (the pipeline passes its flags). Values
    are compared with ``==``. ``epochs`` and ``max_steps`` may change on
    resume: at a constant learning rate more steps continue the same run."""
    progress: bool = True
    """Show a tqdm progress bar when tqdm is installed."""

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        for name in ("lr", "momentum", "weight_decay", "alpha"):
            check_real(name, getattr(self, name), minimum=0.0)
        for name in ("latent_channels", "max_steps", "checkpoint_every"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        key = self.input_key
        if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
            raise TypeError(f"input_key must be a str, an int or None, got "
                            f"{type(key).__name__}")
        _check_device(self.device)
        path = self.checkpoint_path
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a str or an os.PathLike, got "
                            f"{type(path).__name__}")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if (self.resume or self.checkpoint_every) and path is None:
            raise ValueError("resume and checkpoint_every need a checkpoint_path")
        if self.record is not None and not isinstance(self.record, Mapping):
            raise TypeError(f"record must be a mapping or None, got {type(self.record).__name__}")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records and a resume compares: the optimisation fields
        and :attr:`record`.

        Example:
            >>> TranslatorTrainingConfig(record={"batch_size": 8}).settings()["batch_size"]
            8
        """
        own = {name: getattr(self, name) for name in _COMPARED}
        return {**own, **dict(self.record or {})}


_COMPARED = ("lr", "momentum", "weight_decay", "alpha", "input_key")
"""The fields a resume compares with the checkpoint's (the others say how long to train,
where, and how the run is kept and shown)."""


def _check_device(device: Any) -> None:
    if device is None or isinstance(device, torch.device):
        return
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, a torch.device or None, got "
                        f"{type(device).__name__}")
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda:0', ...), got "
                         f"{device!r}") from error


def train_translator(
    teacher: nn.Module,
    loader: Iterable[Any],
    feature_layer: str,
    translator: Translator | None = None,
    config: TranslatorTrainingConfig | None = None,
) -> TranslatorTraining:
    r"""Train a :class:`~segdistill.Translator` on a frozen teacher's features (stage 1).

    Minimises the autoencoder loss of eq. (1),
    :func:`~segdistill.reconstruction_loss`, with SGD and the paper's settings
    (the defaults of :class:`TranslatorTrainingConfig`): one epoch, learning
    rate 0.1 (constant), momentum 0.9, weight decay :math:`10^{-4}`,
    :math:`\alpha = 10^{-7}`. The teacher is frozen (eval mode, no gradients)
    and left with no hooks afterwards.

    Args:
        teacher: the trained teacher.
        loader: yields batches: an image tensor, a tuple/list whose first
            element is the images, or a mapping (see
            :attr:`TranslatorTrainingConfig.input_key`).
        feature_layer: layer path of the teacher's module whose output is
            :math:`\phi_t`, with a selector for a structured output
            (``'encoder[-1]'``, see :class:`~segdistill.FeatureHooks`).
        translator: the translator to train; by default a new one with the
            feature map's channels (and ``config.latent_channels``), made on
            the first batch, or the checkpoint's when resuming.
        config: the schedule, the device and the checkpoints; by default
            ``TranslatorTrainingConfig()``, the paper's settings.

    Returns:
        The trained translator (eval mode) and the loss history.

    Raises:
        TypeError: ``teacher`` is not an ``nn.Module``, ``translator`` not a
            :class:`~segdistill.Translator`, ``config`` not a
            :class:`TranslatorTrainingConfig`, or a batch holds no tensor.
        ValueError: an unknown ``feature_layer``, a captured feature that is
            not 4-D, an empty loader, or a translator whose channels do not
            match the teacher's features.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        >>> images = [torch.randn(4, 3, 16, 16) for _ in range(5)]
        >>> result = train_translator(teacher, images, "1",
        ...                           config=TranslatorTrainingConfig(progress=False))
        >>> len(result.history), result.translator.in_channels
        (5, 8)
    """
    config = _check_arguments(teacher, translator, config)
    device = _device(teacher, config.device)
    teacher.to(device).eval().requires_grad_(False)
    run = _start(translator, config, device)
    hooks = FeatureHooks(teacher, {"features": feature_layer}, "teacher")
    try:
        _train_steps(run, teacher, hooks, loader)
    finally:
        hooks.remove()
    if run.translator is None:
        raise ValueError("the loader yielded no batches")
    if config.checkpoint_path is not None:
        run.save()
    run.translator.eval()
    return TranslatorTraining(run.translator, run.history)


def _check_arguments(teacher: Any, translator: Any, config: Any) -> TranslatorTrainingConfig:
    """``config``, or the default one, once the arguments' types are checked."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"expected the teacher to be an nn.Module, got {type(teacher).__name__}")
    if translator is not None and not isinstance(translator, Translator):
        raise TypeError(f"expected translator to be a segdistill.Translator, got "
                        f"{type(translator).__name__}")
    if config is None:
        return TranslatorTrainingConfig()
    if not isinstance(config, TranslatorTrainingConfig):
        raise TypeError(f"expected config to be a segdistill.TranslatorTrainingConfig, got "
                        f"{type(config).__name__}")
    return config


def _device(teacher: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or by default the teacher's (the CPU for a teacher without parameters)."""
    if device is None:
        first = next(iter(teacher.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return torch.device(device)


@dataclass
class _Run:
    """One call of :func:`train_translator`: the translator, its optimiser and the
    position, and the checkpoint it resumed from."""

    config: TranslatorTrainingConfig
    device: torch.device
    resumed: dict[str, Any] | None
    translator: Translator | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    history: list[float] = field(default_factory=list)

    def attach(self, translator: Translator) -> None:
        """Train ``translator`` from now on: on the device, with a new optimiser, both
        restored from the checkpoint when resuming."""
        c = self.config
        translator.to(self.device).train()
        self.optimizer = torch.optim.SGD(translator.parameters(), lr=c.lr,
                                         momentum=c.momentum, weight_decay=c.weight_decay)
        if self.resumed is not None:
            translator.load_state_dict(self.resumed["translator"])
            self.optimizer.load_state_dict(self.resumed["optimizer"])
        self.translator = translator

    def save(self) -> None:
        """Write the checkpoint: the translator, the optimiser, the step, the history
        and the translator's shape."""
        t, path = self.translator, self.config.checkpoint_path
        assert t is not None and self.optimizer is not None and path is not None
        save_checkpoint(
            {
                "translator": t.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "history": self.history,
                "settings": self.config.settings(),
                "config": {
                    "in_channels": t.in_channels,
                    "latent_channels": t.latent_channels,
                    "num_layers": t.num_layers,
                },
            },
            path,
        )


def _start(translator: Translator | None, config: TranslatorTrainingConfig,
           device: torch.device) -> _Run:
    """A fresh run, or the one the checkpoint holds when ``config.resume`` and it exists
    (its translator made from the checkpoint's shape when none is given)."""
    path = config.checkpoint_path
    state = None
    if config.resume and path is not None and os.path.exists(path):
        state = load_checkpoint(path, map_location=device)
        _check_settings(path, state.get("settings"), config.settings())
        if translator is None:
            translator = Translator(**state["config"])
    run = _Run(config, device, state)
    if state is not None:
        run.step, run.history = int(state["step"]), [float(v) for v in state["history"]]
    if translator is not None:
        run.attach(translator)
    return run


def _check_settings(path: str | os.PathLike[str], recorded: Mapping[str, Any] | None,
                    current: Mapping[str, Any]) -> None:
    """Refuse to resume from ``path`` when the settings it ``recorded`` differ from the
    ``current`` ones, listing each difference (``None``: a checkpoint older than the
    record, which is resumed as before)."""
    changed = [] if recorded is None else changed_settings(recorded, current)
    if changed:
        raise ValueError(f"cannot resume from {os.fspath(path)}: it was written with other "
                         "settings than this run's:\n" + "\n".join(changed) + "\ngive the "
                         "values it records, or train afresh with resume=False")


def _train_steps(run: _Run, teacher: nn.Module, hooks: FeatureHooks,
                 loader: Iterable[Any]) -> None:
    """The steps of ``config.epochs`` passes over ``loader``, skipping the batches
    trained on before a resume and stopping at ``config.max_steps``; a checkpoint
    every ``config.checkpoint_every`` steps."""
    c = run.config
    seen = 0
    for batch in _progress(_batches(loader, c.epochs), c.progress, _total(loader, c)):
        seen += 1
        if seen <= run.step:  # already trained on before the resume
            continue
        if c.max_steps is not None and run.step >= c.max_steps:
            break
        features = _teacher_features(teacher, hooks, batch, c.input_key, run.device)
        if run.translator is None:
            run.attach(Translator(features.shape[1], c.latent_channels))
        assert run.translator is not None and run.optimizer is not None
        out = run.translator(features)
        loss = reconstruction_loss(features, out.reconstruction, out.latent, alpha=c.alpha)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        run.optimizer.step()
        run.step += 1
        run.history.append(loss.item())
        if c.checkpoint_every and run.step % c.checkpoint_every == 0:
            run.save()


def _total(loader: Iterable[Any], config: TranslatorTrainingConfig) -> int | None:
    """The steps the progress bar expects: ``None`` for a loader without a length."""
    if not isinstance(loader, Sized):
        return None
    total = config.epochs * len(loader)
    return total if config.max_steps is None else min(total, config.max_steps)


def _teacher_features(
    teacher: nn.Module,
    hooks: FeatureHooks,
    batch: Any,
    input_key: str | int | None,
    device: torch.device,
) -> Tensor:
    if input_key is None:
        input_key = "image" if isinstance(batch, Mapping) else 0
    images = batch if isinstance(batch, Tensor) else select_output(batch, input_key, "the batch")
    with torch.no_grad():
        teacher(images.to(device, non_blocking=True))
    # a ViT teacher's tokens (FeatureSpec(tokens=...)) go on the grid of these images
    return take_feature(hooks.pop(image_size(images)), "features", hooks.what("features"))
