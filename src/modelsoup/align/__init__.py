"""Permutation alignment: put the hidden units of models trained from different starts in the same order, so that their
weights line up and they can be averaged (Git Re-Basin, Ainsworth et al. 2023; REPAIR, Jordan et al. 2023).

One job per module: :mod:`.spec` (which units can be permuted together: traced, from a config, or declared),
:mod:`.matching` (weight matching, activation matching, applying permutations), :mod:`.models` (building the
modules, the function check), :mod:`.core` (``align`` and writing the aligned models), :mod:`.repair` (REPAIR of
an interpolated model's activation statistics).
"""

from .core import AlignResult, ModelAlignment, align, save_aligned
from .matching import (
    activation_matching,
    apply_permutation,
    compose,
    identity,
    invert,
    weight_distance,
    weight_matching,
)
from .models import ALIGN_RTOL, arch_factory, check_function, hf_factory
from .repair import interpolate_states, repair
from .spec import (
    AlignmentError,
    Axis,
    Group,
    PermutationSpec,
    Site,
    config_spec,
    load_spec,
    permutation_spec,
    spec_from_dict,
    trace_spec,
)

__all__ = [
    "ALIGN_RTOL", "AlignResult", "AlignmentError", "Axis", "Group", "ModelAlignment", "PermutationSpec", "Site", "activation_matching", "align",
    "apply_permutation", "arch_factory", "check_function", "compose", "config_spec", "hf_factory", "identity", "interpolate_states", "invert",
    "load_spec", "permutation_spec", "repair", "save_aligned", "spec_from_dict", "trace_spec", "weight_distance", "weight_matching",
]
