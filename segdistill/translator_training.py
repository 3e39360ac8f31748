"""Stage 1: train the knowledge translator on a frozen teacher's features."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segdistill._checks import check_positive_int, check_real
from segdistill.checkpoint import load_checkpoint, save_checkpoint
from segdistill.hooks import FeatureHooks, select_output, take_feature
from segdistill.losses.reconstruction import reconstruction_loss
from segdistill.translator import Translator

__all__ = ["TranslatorTraining", "train_translator"]


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


def train_translator(
    teacher: nn.Module,
    loader: Iterable[Any],
    feature_layer: str,
    translator: Translator | None = None,
    *,
    epochs: int = 1,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    alpha: float = 1e-7,
    latent_channels: int | None = None,
    max_steps: int | None = None,
    input_key: str | int | None = None,
    device: str | torch.device | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TranslatorTraining:
    r"""Train a :class:`~segdistill.Translator` on a frozen teacher's features (stage 1).

    Minimises the autoencoder loss of eq. (1),
    :func:`~segdistill.reconstruction_loss`, with SGD and the paper's settings:
    one epoch, learning rate 0.1 (constant), momentum 0.9, weight decay
    :math:`10^{-4}`, :math:`\alpha = 10^{-7}`. The teacher is frozen (eval mode,
    no gradients) and left with no hooks afterwards.

    Args:
        teacher: the trained teacher.
        loader: yields batches: an image tensor, a tuple/list whose first
            element is the images, or a mapping (see ``input_key``).
        feature_layer: layer path of the teacher's module whose output is
            :math:`\phi_t`, with a selector for a structured output
            (``'encoder[-1]'``, see :class:`~segdistill.FeatureHooks`).
        translator: the translator to train; by default a new one with the
            feature map's channels, made on the first batch.
        epochs: passes over ``loader``.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        alpha: weight of the latent's L1 term in eq. (1).
        latent_channels: the new translator's code channels (default
            :math:`C_t`); ignored when ``translator`` is given.
        max_steps: stop after this many steps in all.
        input_key: which entry of a batch holds the images (default: the
            batch itself if it is a tensor, its first element if a sequence,
            ``'image'`` if a mapping).
        device: where to train; by default the teacher's device.
        checkpoint_path: write a checkpoint (atomically) there every
            ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_path`` if it exists: the
            translator, the optimiser, the step and the history are restored
            and the first batches, already seen, are skipped. With a shuffling
            ``DataLoader`` give it a seeded generator so the order repeats.
        progress: show a tqdm progress bar when tqdm is installed.

    Returns:
        The trained translator (eval mode) and the loss history.

    Raises:
        TypeError: ``teacher`` is not an ``nn.Module``, or a batch holds no tensor.
        ValueError: bad hyperparameters, an unknown ``feature_layer``, a
            captured feature that is not 4-D, an empty loader, or a translator
            whose channels do not match the teacher's features.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        >>> images = [torch.randn(4, 3, 16, 16) for _ in range(5)]
        >>> result = train_translator(teacher, images, "1", progress=False)
        >>> len(result.history), result.translator.in_channels
        (5, 8)
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"expected the teacher to be an nn.Module, got {type(teacher).__name__}")
    if translator is not None and not isinstance(translator, Translator):
        raise TypeError(f"expected translator to be a segdistill.Translator, got "
                        f"{type(translator).__name__}")
    check_positive_int("epochs", epochs)
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("alpha", alpha)):
        check_real(name, value, minimum=0.0)
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
    if (resume or checkpoint_every) and checkpoint_path is None:
        raise ValueError("resume and checkpoint_every need a checkpoint_path")

    if device is None:
        first = next(iter(teacher.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    teacher.to(device).eval().requires_grad_(False)

    state = None
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path, map_location=device)
        if translator is None:
            translator = Translator(**state["config"])
    step = 0 if state is None else int(state["step"])
    history: list[float] = [] if state is None else [float(v) for v in state["history"]]
    optimizer: torch.optim.Optimizer | None = None

    def make_optimizer(module: Translator) -> torch.optim.Optimizer:
        module.to(device).train()
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum,
                              weight_decay=weight_decay)
        if state is not None:
            module.load_state_dict(state["translator"])
            opt.load_state_dict(state["optimizer"])
        return opt

    def save() -> None:
        assert translator is not None and optimizer is not None and checkpoint_path is not None
        save_checkpoint(
            {
                "translator": translator.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "history": history,
                "config": {
                    "in_channels": translator.in_channels,
                    "latent_channels": translator.latent_channels,
                    "num_layers": translator.num_layers,
                },
            },
            checkpoint_path,
        )

    if translator is not None:
        optimizer = make_optimizer(translator)

    total = None
    if isinstance(loader, Sized):
        total = epochs * len(loader)
        if max_steps is not None:
            total = min(total, max_steps)
    hooks = FeatureHooks(teacher, {"features": feature_layer}, "teacher")
    seen = 0
    try:
        for batch in _progress(_batches(loader, epochs), progress, total):
            seen += 1
            if seen <= step:  # already trained on before the resume
                continue
            if max_steps is not None and step >= max_steps:
                break
            features = _teacher_features(teacher, hooks, batch, input_key, device)
            if translator is None:
                translator = Translator(features.shape[1], latent_channels)
                optimizer = make_optimizer(translator)
            assert optimizer is not None
            out = translator(features)
            loss = reconstruction_loss(features, out.reconstruction, out.latent, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            history.append(loss.item())
            if checkpoint_every and step % checkpoint_every == 0:
                save()
    finally:
        hooks.remove()
    if translator is None:
        raise ValueError("the loader yielded no batches")
    if checkpoint_path is not None:
        save()
    translator.eval()
    return TranslatorTraining(translator, history)


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
    return take_feature(hooks.pop(), "features", hooks.what("features"))
