"""Former home of the gated layers' particles and of ``project_psd``, kept so that documented imports still work.

The code lives in :mod:`gpytorch_tp.layers.gated.particles` and
:mod:`gpytorch_tp.layers.gated.psd_projection`.
"""

from .layers.gated.particles import JITTER, PairParticles, StepStack, base_normals
from .layers.gated.psd_projection import project_psd

__all__ = ["JITTER", "PairParticles", "StepStack", "base_normals", "project_psd"]
