"""Tensor programs: any network's exact kernels by the master theorem (Yang, *Tensor Programs I/II*).

* :mod:`.program`: the program model (G-vars, H-vars, blocks of coordinates);
* :mod:`.trace`: a ``torch.nn.Module`` traced into a program by running it, with the handlers of
  :mod:`.feature_ops` (feature vectors), :mod:`.sequence_ops` (sequences, attention, recurrent
  modules) and :mod:`.grid_ops` (images), which build expressions (:mod:`.expressions`) and record
  numbers per item (:mod:`.traced`);
  :mod:`.refusals` names what is not compiled;
* :mod:`.gaussian`: Gaussian expectations by quadrature;
* :mod:`.master_theorem`: the covariance and NTK recursion, as a layer (:class:`CompiledProgram`).
"""

from .compiler import compile_module
from .master_theorem import CompiledProgram
from .program import Program
from .trace import trace_program

__all__ = ["CompiledProgram", "Program", "compile_module", "trace_program"]
