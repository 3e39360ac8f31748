"""Reference pipelines: the paper's Pascal VOC and Cityscapes setups, end to end.

Run ``python -m examples.segmentation --help`` from the repository root; see
``examples/README.md``.
"""
