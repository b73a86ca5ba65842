"""certserve's statistics core: numpy/scipy only, no torch, no HTTP.

Every function that yields a certificate documents what it bounds, at which alpha, and whether the guarantee is
per input (Cohen, clean-class fixed-n, sequential e-process) or marginal over inputs (RRISE conformal surrogate).
"""

from smoothing.cohen import ABSTAIN, CohenCertificate, certify, clopper_pearson_lower, clopper_pearson_upper, predict
from smoothing.conformal import (
    conformal_quantile,
    conformal_rank,
    min_calibration_size,
    rrise_lower,
    rrise_radius,
    rrise_scores,
)
from smoothing.confseq import certified_radius, lower_bound, upper_bound
from smoothing.eprocess import log_e_value, rejects
from smoothing.fixed import DEFAULT_PLAN_GAIN, fixed_n_certificate, planned_sample_size
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR
from smoothing.radius import probability_for_radius, radius_from_probability
from smoothing.stopping import (
    DEFAULT_MIN_GAIN,
    Stop,
    best_radius_decision,
    checkpoint_schedule,
    target_radius_decision,
)

__all__ = [
    "ABSTAIN", "CohenCertificate", "DEFAULT_KT_WEIGHT", "DEFAULT_MIN_GAIN", "DEFAULT_PLAN_GAIN", "KT_PRIOR", "Stop",
    "best_radius_decision", "certified_radius", "certify", "checkpoint_schedule", "clopper_pearson_lower",
    "clopper_pearson_upper", "conformal_quantile", "conformal_rank", "fixed_n_certificate", "log_e_value",
    "lower_bound", "min_calibration_size", "planned_sample_size", "predict", "probability_for_radius",
    "radius_from_probability", "rejects", "rrise_lower", "rrise_radius", "rrise_scores", "target_radius_decision",
    "upper_bound",
]
