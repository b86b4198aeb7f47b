"""Evaluation of each kind of attack on one model: evasion (with its flags and adaptive rerun),
universal perturbations, sparse (L0) attacks, poisoning, and the search-diversity index.
"""
