"""Pure S5 and S4D math: HiPPO-N init (hippo.py, init.py), discretisation (discretize.py), the S5
operator (s5.py), S4D (s4d.py, with s4d_kernel.py and s4d_chunked.py), and the linear recurrence
they share (recurrence.py picks its implementation: chunked_scan.py or pallas_scan.py, in
planar_complex.py's arithmetic).

Imports nothing from the rest of s5scale (docs/design.md, "Layout").
"""

from s5scale.ssm.discretize import (clip_real_part, discretization_factors, discretize_bilinear,
                                    discretize_zoh)
from s5scale.ssm.hippo import (make_block_hippo, make_dplr_hippo, make_hippo_legs,
                               validate_state_sizes)
from s5scale.ssm.init import (S4D_INITS, make_s4d_lambda, validate_s4d_args,
                             validate_ssm_args)
from s5scale.ssm.mesh_spec import time_axis
from s5scale.ssm.recurrence import IMPLS, linear_recurrence, linear_recurrence_planar
from s5scale.ssm.s4d import s4d_conv, s4d_recurrence, s4d_states, s4d_step
from s5scale.ssm.s4d_chunked import s4d_chunked
from s5scale.ssm.s4d_kernel import bidirectional_conv, causal_conv, s4d_kernel
from s5scale.ssm.s5 import apply_ssm, project_input, project_output, scan_states, step

__all__ = [
    "IMPLS", "apply_ssm", "bidirectional_conv", "causal_conv", "clip_real_part",
    "discretization_factors", "discretize_bilinear", "discretize_zoh", "linear_recurrence",
    "linear_recurrence_planar", "make_block_hippo", "make_dplr_hippo", "make_hippo_legs",
    "make_s4d_lambda", "project_input", "project_output", "s4d_chunked", "s4d_conv", "S4D_INITS",
    "s4d_kernel", "s4d_recurrence", "s4d_states", "s4d_step", "scan_states", "step",
    "time_axis", "validate_s4d_args", "validate_ssm_args", "validate_state_sizes",
]
