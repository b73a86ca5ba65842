"""The offline pipeline: data, noise-trained base model, Monte-Carlo counts, RRISE surrogate with conformal
calibration, meta-learned Beta priors, bundle building and the evaluation report."""
