"""Training: the :class:`~robustbench_lite.training.defense.Defense` base with its loop, and the
trained-model cache.
"""
