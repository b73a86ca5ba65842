"""Meta-learned Beta priors (Halt Fast): clean-input features -> Beta(a, b) for the tested class's hit rate pA.

Objective: maximum beta-binomial likelihood of held-out Monte-Carlo counts (k_i of the tested class out of n_i),
i.e. maximize sum_i [log B(k_i + a_i, n_i - k_i + b_i) - log B(a_i, b_i)]. That log-ratio is exactly the log
numerator of the mixture e-process, so the objective maximizes the e-process's expected log growth on data like
the training counts. The fitted model sees only clean-input features; it never sees the samples it is tested on.
"""

from __future__ import annotations

import numpy as np
import torch

from models.networks import MetaPrior


def _betaln(a, b):
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def beta_binomial_nll(ab: torch.Tensor, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    a, b = ab[:, 0], ab[:, 1]
    return -(_betaln(k + a, n - k + b) - _betaln(a, b)).mean()


def fit_meta_prior(features: np.ndarray, hits: np.ndarray, trials: np.ndarray, *, steps: int = 1500,
                   lr: float = 1e-2, seed: int = 2) -> tuple[MetaPrior, dict]:
    """Fit :class:`MetaPrior` by full-batch Adam on the beta-binomial NLL; returns the model and fit statistics."""
    torch.manual_seed(seed)
    model = MetaPrior(num_features=features.shape[1])
    x = torch.as_tensor(features, dtype=torch.float32)
    k = torch.as_tensor(hits, dtype=torch.float64)
    n = torch.as_tensor(trials, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = beta_binomial_nll(model(x).double(), k, n)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll = float(beta_binomial_nll(model(x).double(), k, n))
        kt = float(beta_binomial_nll(torch.full((len(k), 2), 0.5, dtype=torch.float64), k, n))
    return model.eval(), {"nll_per_image": nll, "kt_nll_per_image": kt, "num_images": int(len(k)), "steps": steps}
