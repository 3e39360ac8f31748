"""The reference pipeline: the paper's setups end to end, on Pascal VOC, Cityscapes and
the digit scenes (the CPU demo), built on the segdistill library.

Run ``python -m examples.segmentation --help`` from the repository root; see
``examples/README.md``. ``python -m examples.segmentation.ablation`` runs the
ablation over the same stages.
"""
