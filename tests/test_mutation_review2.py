"""Mutation audit of the soundness tests, round 2: one test per injected bug that no earlier test caught.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. The service is seeded (create_app(...,
seed=0)); what is checked is fixed before sampling (the planned n) or follows from it.
"""

from __future__ import annotations

import numpy as np

from models.engine import JobSpec
from tests import server_api_helpers
from tests.server_api_helpers import MAX_SAMPLES, SIGMA, check_certificate, quantized

fmnist = server_api_helpers.fmnist  # module-scoped fixtures: this module's own app
client = server_api_helpers.client

#: Fashion-MNIST test images whose planned n is interior (64 < n < budget) and moves with the prior: a prior read
#: off a noisy copy of any of them plans another n nearly always (measured: 24 of 25 noisy copies did).
UNCERTAIN = (0, 4, 6, 8, 10)


def test_a_fixed_job_spends_the_n_planned_from_the_clean_image_prior(client, fmnist, monkeypatch):
    """mode=fixed: n is planned (smoothing.planned_sample_size) from the clean image's prior alone, so n is
    independent of the noise samples and the Clopper-Pearson bound on S_n is valid; the job then spends exactly
    that n. Bug guarded against (run against it, this test failed each time): CertificationService._job_spec
    planning n from the prior of a noisy copy of the image (image + N(0, sigma^2)) while the job kept the clean
    class and prior (three runs: n = 344, 344, 379 planned for image 0 instead of 742). tests/test_mutation_review.py
    checks the spec's class and prior, not its n; the routing test (tests/test_server_routing.py, mode=fixed) uses
    the easy image, whose plan is the same under noise (n = 989 for every noisy copy), so both passed with the bug."""
    from models.priors import class_and_prior, softmax
    from smoothing import planned_sample_size

    service = client.app.state.service
    alpha = service.config.default_alpha
    specs: list[JobSpec] = []
    submit = service.engine.submit
    monkeypatch.setattr(service.engine, "submit", lambda spec: (specs.append(spec), submit(spec))[1])
    for i in UNCERTAIN:
        img = quantized(fmnist.x_test[i])
        logits = service.surrogate.forward(img[None])
        tested, priors = class_and_prior(service.base, service.surrogate, service.meta, img[None], softmax(logits))
        n = int(planned_sample_size(priors[0, 0], priors[0, 1], sigma=SIGMA, alpha=alpha, budget=MAX_SAMPLES))
        assert 64 < n < MAX_SAMPLES, (i, n)  # interior: the plan depends on the prior
        r = client.post("/certify", json={"image": img.tolist(), "mode": "fixed"})
        assert r.status_code == 200, r.text
        cert = check_certificate(r.json())
        spec = specs[-1]
        assert (spec.kind, spec.tested_class, spec.budget) == ("fixed", int(tested[0]), n), i
        assert (cert.method, cert.samples, cert.stopped_by, cert.guarantee.alpha) == ("fixed", n, "planned", alpha), i
    assert len(specs) == len(UNCERTAIN)
