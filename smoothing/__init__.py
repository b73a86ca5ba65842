"""certserve's statistics core: numpy/scipy only, no torch, no HTTP.

Every function that yields a certificate documents what it bounds, at which alpha, and whether the guarantee is
per input (Cohen, clean-class fixed-n, sequential e-process) or marginal over inputs (the surrogate's conformal calibration, probit scores in Mondrian bins).
"""

from smoothing.cohen import ABSTAIN, CohenCertificate, certify, clopper_pearson_lower, clopper_pearson_upper, predict
from smoothing.conformal import (
    DEFAULT_LEVELS,
    bin_index,
    conformal_certificate,
    conformal_lower,
    conformal_quantile,
    conformal_rank,
    level_split,
    min_calibration_size,
    mondrian_quantiles,
    probit_labels,
    surrogate_log_odds,
    training_conditional_rank,
)
from smoothing.confseq import certified_radius, lower_bound, upper_bound
from smoothing.eprocess import log_e_value, rejects
from smoothing.fixed import DEFAULT_PLAN_GAIN, fixed_n_certificate, planned_sample_size
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR
from smoothing.radius import probability_for_radius, radius_from_probability, radius_from_probit
from smoothing.stopping import (
    DEFAULT_MIN_GAIN,
    DEFAULT_PROPOSAL_SHRINK,
    PER_INPUT_MIN_GAIN,
    Stop,
    best_radius_decision,
    checkpoint_schedule,
    proposal_decision,
    proposal_radius,
    target_radius_decision,
)

__all__ = [
    "ABSTAIN", "CohenCertificate", "DEFAULT_KT_WEIGHT", "DEFAULT_LEVELS", "DEFAULT_MIN_GAIN", "DEFAULT_PLAN_GAIN", "DEFAULT_PROPOSAL_SHRINK", "PER_INPUT_MIN_GAIN", "KT_PRIOR", "Stop",
    "best_radius_decision", "bin_index", "certified_radius", "certify", "checkpoint_schedule",
    "clopper_pearson_lower", "clopper_pearson_upper", "conformal_certificate", "conformal_lower", "conformal_quantile",
    "conformal_rank", "level_split", "mondrian_quantiles", "probit_labels", "surrogate_log_odds",
    "training_conditional_rank", "fixed_n_certificate", "log_e_value",
    "lower_bound", "min_calibration_size", "planned_sample_size", "predict", "probability_for_radius", "proposal_decision", "proposal_radius",
    "radius_from_probability", "radius_from_probit", "rejects", "target_radius_decision",
    "upper_bound",
]
