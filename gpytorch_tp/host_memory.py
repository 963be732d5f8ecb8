"""Moved to :mod:`gpytorch_tp.evaluation.host_memory`; this path keeps working for code written before the move.

The module object is the same one, so its functions, classes and settings are shared, not copied.
"""

import sys

from .evaluation import host_memory

sys.modules[__name__] = host_memory
