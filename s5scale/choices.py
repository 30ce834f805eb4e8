"""The names a config may choose for each code path, in a module that imports nothing.

Checking a config (defaults.py, config_check.py, and `python -m s5scale.validate`, which the pod
launcher runs before it creates a slice) reads the choices from here, so it needs no JAX and a
bad config exits 2 in a fraction of a second. The module that implements each choice keys its
code by these names; tests/test_config_validation.py runs every name through that code.
"""

# The model (nn/blocks.py; model.remat in nn/model.py).
LAYERS = ("s5", "s4d")                                          # model.layer
NORMS = ("layer", "rms", "batch")                               # model.norm
ACTIVATIONS = ("full_glu", "half_glu1", "half_glu2", "gelu")    # model.activation
REMAT_POLICIES = ("none", "full", "dots", "offload")            # model.remat

# The SSM (ssm/discretize.py, ssm/init.py, ssm/recurrence.py).
DISCRETIZATIONS = ("zoh", "bilinear")                           # model.discretization
C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")  # model.c_init
S4D_INITS = ("legs", "lin")                                     # model.s4d_init
SCAN_IMPLS = ("auto", "chunked", "pallas", "reference")         # model.scan_impl

# The data (data/audio.py).
QUANTIZATIONS = ("mulaw", "linear")                             # data.quantization
