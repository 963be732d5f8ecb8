"""Moved to :mod:`gpytorch_tp.evaluation.matrix_free`; this path keeps working for code written before the move.

The module object is the same one, so its functions, classes and settings are shared, not copied.
"""

import sys

from .evaluation import matrix_free

sys.modules[__name__] = matrix_free
