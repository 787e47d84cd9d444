"""A third-party-style plugin used by the registry tests (not installed; added through a fake entry point)."""

import torch

from prunekit.plugin import Scorer, ScorerRun, hookimpl


class _Run(ScorerRun):
    def __init__(self, n):
        self.n = n

    def gains(self):
        return self.n


class FeatureNorm(Scorer):
    """Gain = L2 norm of the token (a toy 'saliency')."""

    name = "feature_norm"

    def start(self, inputs):
        return _Run(inputs.features.norm(dim=-1))


@hookimpl
def prunekit_register_scorers(register):
    register(FeatureNorm)
