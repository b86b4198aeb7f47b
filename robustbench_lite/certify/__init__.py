"""Certificates: deterministic verifiers and the probabilistic certificate of randomized smoothing."""
