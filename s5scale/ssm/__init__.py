"""Pure S5 math: HiPPO-N init, discretisation, the linear recurrence (recurrence.py picks its
implementation), parallel and recurrent scans.

Imports nothing from the rest of s5scale (DESIGN.md §2).
"""

from s5scale.ssm.discretize import (clip_real_part, discretization_factors, discretize_bilinear,
                                    discretize_zoh)
from s5scale.ssm.hippo import (make_block_hippo, make_dplr_hippo, make_hippo_legs,
                               validate_state_sizes)
from s5scale.ssm.init import validate_ssm_args
from s5scale.ssm.recurrence import IMPLS, linear_recurrence, linear_recurrence_planar
from s5scale.ssm.scan import apply_ssm, project_input, project_output, scan_states, step

__all__ = [
    "IMPLS", "apply_ssm", "clip_real_part", "discretization_factors", "discretize_bilinear",
    "discretize_zoh", "make_block_hippo", "make_dplr_hippo", "make_hippo_legs", "linear_recurrence",
    "linear_recurrence_planar", "project_input",
    "project_output", "scan_states", "step", "validate_ssm_args", "validate_state_sizes",
]
