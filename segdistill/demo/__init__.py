"""A small-scale reproduction of the paper's pipeline and ablation that runs on a CPU.

Needs the ``demo`` extra (scikit-learn for the digits, matplotlib for the figure).
Run ``python -m segdistill.demo``; see :mod:`segdistill.demo.run`.
"""
