"""The base everything builds on: registries, threat models and norm geometry, settings, tensor ops,
data and datasets, the model zoo, devices, and the attack bases.
"""
