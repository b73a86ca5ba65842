"""Mutation audit, round 8c: configuration and the bundle on disk -- every ``CERTSERVE_*`` setting's bounds and
checks (server.settings), the service's part of them (certification.config), the shared defaults (models.defaults),
the bundle directory's lock and the clean-up of killed builds (models.bundle_dir), JSON with each key once
(models.strict_json), the ONNX export's checks (models.export) and the networks it exports (models.networks).

Each test names the mutant it guards against (injected by editing the code once, in a private clone, never
committed) and was run against it: it failed with the mutant and passes without it. The last settings test is the
regression test of a real bug this round found and fixed: one setting given by two variables whose names differ only
in case (``CERTSERVE_API_KEYS=secret`` and ``certserve_api_keys=``) was read from whichever came last in the
environment, so the server could start without authentication; it failed on the code before the fix. Real
components: pydantic-settings over a patched environment, real directories and ``flock``, real ONNX exports and
onnxruntime sessions of tiny torch modules. Every generator is seeded; each test takes well under a few seconds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
from dataclasses import FrozenInstanceError

import pytest
import torch
from pydantic import ValidationError

from certification.config import ServiceConfig
from models import bundle_dir
from models.bundle import DEFAULT_BUNDLE_DIR, BundleError, load_bundle
from models.defaults import default_batch_size
from models.export import export_onnx
from models.networks import MetaPrior, SmallCNN
from models.strict_json import RepeatedKey, unique_keys
from server.settings import Settings

ENV = "CERTSERVE_"


@pytest.fixture
def clean_env(monkeypatch):
    """No CERTSERVE_ variable of the host leaks into a test; returns a setter of ``CERTSERVE_<NAME>``."""
    import os

    for name in [k for k in os.environ if k.upper().startswith(ENV)]:
        monkeypatch.delenv(name)
    return lambda name, value: monkeypatch.setenv(name if name.lower().startswith("certserve_") else ENV + name,
                                                  value)


# ------------------------------------------------------------------------------------------------ server.settings
REFUSED = [("PORT", "65536"), ("DEFAULT_ALPHA", "1"), ("MAX_SAMPLES", "99"), ("AUTO_MAX_SAMPLES", "99"),
           ("COHEN_N0", "0"), ("BATCH_SIZE", "-1"), ("MAX_LIVE_JOBS", "0"), ("SAMPLER_NICE", "20"),
           ("MAX_INFLIGHT_REQUESTS", "0"), ("DEFAULT_DEADLINE_MS", "0"), ("MAX_BODY_BYTES", "1023"),
           ("BODY_TIMEOUT_SECONDS", "0"), ("KEEP_ALIVE_SECONDS", "0"), ("KEEP_ALIVE_SECONDS", "3601"),
           ("MAX_PIXELS", "0"), ("MAX_BATCH_IMAGES", "0"), ("DRAIN_SECONDS", "-1"), ("THREADS", "1025")]


@pytest.mark.parametrize("name, value", REFUSED, ids=[f"{n}={v}" for n, v in REFUSED])
def test_the_first_value_past_each_bound_is_refused_at_start(clean_env, name, value):
    """Mutants: each bound moved by one or dropped (port le=65536, default_alpha le=1, max_samples / auto_max_samples
    ge=1, cohen_n0 ge=0, batch_size without ge=0, max_live_jobs / max_inflight_requests / default_deadline_ms /
    max_pixels / max_batch_images ge=0, sampler_nice le=20, max_body_bytes ge=1, body_timeout_seconds and
    keep_alive_seconds ge=0, keep_alive_seconds without le=3600, drain_seconds without ge=0): the server started
    with a value no request can work with (a zero admission limit, a 0-sample Cohen selection, a negative drain)."""
    clean_env(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


ACCEPTED = [("PORT", "65535", 65535), ("DEFAULT_ALPHA", "1e-15", 1e-15), ("AUTO_MIN_SURROGATE_Z", "0", 0.0),
            ("MAX_SAMPLES", "100", 100), ("SAMPLER_NICE", "19", 19), ("MAX_BODY_BYTES", "1024", 1024)]


@pytest.mark.parametrize("name, value, read", ACCEPTED, ids=[f"{n}={v}" for n, v, _ in ACCEPTED])
def test_the_documented_edge_values_are_accepted_as_given(clean_env, name, value, read):
    """Mutants: ``v <= 1e-15`` for ``v < 1e-15`` (a default alpha of 1e-15, 'at least 1e-15', refused) and
    auto_min_surrogate_z ``gt=0`` for ``ge=0`` (README: ``0``, whenever the surrogate certifies, refused)."""
    clean_env(name, value)
    assert getattr(Settings(), name.lower()) == read


def test_require_signing_with_a_blank_signing_key_is_refused(clean_env):
    """Mutant: ``not self.signing_key`` for ``not (self.signing_key or "").strip()``: CERTSERVE_SIGNING_KEY=" " with
    CERTSERVE_REQUIRE_SIGNING=true passed the check that promises no unsigned start."""
    clean_env("REQUIRE_SIGNING", "true")
    clean_env("SIGNING_KEY", "  ")
    with pytest.raises(ValidationError, match="no signing key is configured"):
        Settings()


def test_a_lower_case_name_of_a_real_setting_is_read_not_refused(clean_env):
    """Mutant: ``k not in known`` for ``k.upper() not in known``: pydantic-settings reads names case-insensitively,
    so ``certserve_max_samples=20000`` is the setting; the mutant refused it as unknown."""
    clean_env("certserve_max_samples", "20000")
    assert Settings().max_samples == 20000


def test_a_misspelling_gets_the_nearest_variable_as_its_hint(clean_env):
    """Mutant: difflib cutoff 0.9 for 0.75: ``CERTSERVE_DRAIN_SECS`` (ratio 0.87) lost its 'did you mean'."""
    clean_env("DRAIN_SECS", "5")
    with pytest.raises(ValidationError, match="did you mean CERTSERVE_DRAIN_SECONDS"):
        Settings()


@pytest.mark.parametrize("name, value", [("CERTSERVE_X_SERVICE_PORT", "http"), ("CERTSERVE_X_SERVICE_HOSTS", "10.0.0.1")])
def test_only_true_kubernetes_service_links_pass(clean_env, name, value):
    """Mutants: the 'number' form without ``isdigit()`` (a ``_SERVICE_PORT`` of any text passed) and
    ``pattern.match`` for ``pattern.fullmatch`` (any name that merely begins like a link passed): either way a
    misspelled variable could slip past the unknown-variable check."""
    clean_env(name, value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_one_setting_given_by_two_names_that_differ_in_case_is_refused(clean_env):
    """Real bug (fixed here): ``CERTSERVE_API_KEYS=secret`` and ``certserve_api_keys=`` were both read as api_keys,
    the later one in the environment winning, so the server could start without authentication although the
    key was set. Refused now, naming both variables (and neither value)."""
    clean_env("API_KEYS", "secret")
    clean_env("certserve_api_keys", "")
    with pytest.raises(ValidationError, match="CERTSERVE_API_KEYS.*certserve_api_keys") as info:
        Settings()
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------------- certification.config, defaults
def test_the_service_config_defaults_are_the_settings_defaults(clean_env):
    """Mutants: a ServiceConfig default drifting from the server's (default_deadline_ms 3000, sampler_nice 0,
    device "cpu"): a service built without Settings (bench/signing.py, the offline tools) ran other limits."""
    assert ServiceConfig() == Settings().service_config()


SERVICE_VALUES = {"default_alpha": 0.01, "max_samples": 20_000, "auto_max_samples": 3_000, "auto_min_surrogate_z": 0.5,
                  "cohen_n0": 50, "default_deadline_ms": 10_000, "device": "cpu", "threads": 2, "batch_size": 256,
                  "max_live_jobs": 7, "sampler_idle": False, "sampler_nice": 3, "signing_key": "keys/",
                  "audit_log": "audit.jsonl", "audit_max_bytes": 5, "audit_backups": 2, "audit_fsync": True}


def test_every_configured_service_setting_reaches_the_service(clean_env):
    """Mutant: service_config() forwarding each field's default instead of the configured value: the service ran
    with the defaults whatever CERTSERVE_MAX_SAMPLES, CERTSERVE_AUDIT_FSYNC, ... said."""
    assert set(SERVICE_VALUES) == set(ServiceConfig.__dataclass_fields__)
    assert all(value != getattr(ServiceConfig(), name) for name, value in SERVICE_VALUES.items())
    for name, value in SERVICE_VALUES.items():
        clean_env(name.upper(), str(value).lower() if isinstance(value, bool) else str(value))
    assert Settings().service_config() == ServiceConfig(**SERVICE_VALUES)


def test_the_service_config_cannot_be_changed_after_it_is_built():
    """Mutant: ``@dataclass`` for ``@dataclass(frozen=True)``: one request path could change the limits of all."""
    with pytest.raises(FrozenInstanceError):
        ServiceConfig().max_samples = 10**9


def test_the_default_batch_sizes_are_the_documented_ones():
    """Mutants: GPU_BATCH_SIZE 8192, CPU_BATCH_SIZE 2048, the device test inverted (README: 16384 GPU, 1024 CPU)."""
    assert (default_batch_size("cuda"), default_batch_size("cpu")) == (16_384, 1_024)


# ------------------------------------------------------------------------------------------------ models.bundle_dir
def _staging_like(root, name: str, files: dict[str, bytes]):
    path = root / name
    path.mkdir()
    for file, data in files.items():
        (path / file).write_bytes(data)
    return path


@pytest.mark.parametrize("name, files", [
    (".staging-notes", {"manifest.json": b"{}"}),  # not mkdtemp's 8 characters
    (".staging-abcdefgh.keep", {"manifest.json": b"{}"}),  # only begins like one
    (".staging-abcdefgh", {"manifest.json": b"{}", "my-notes.txt": b"mine"}),  # holds a file no build stages
])
def test_a_users_directory_that_only_looks_like_a_staging_one_survives_a_build(tmp_path, name, files):
    """Mutants: the staging name's ``{8}`` made ``+``, ``fullmatch`` made ``match``, ``all`` made ``any`` and the
    ``p.name in _STAGED_FILES`` test dropped: a build of the directory deleted a user's files."""
    keep = _staging_like(tmp_path, name, files)
    killed = _staging_like(tmp_path, ".staging-k1ll3d_x", {"base.onnx": b"x", "manifest.json": b"{}"})
    with bundle_dir.build_lock(tmp_path):
        pass
    assert keep.is_dir() and sorted(p.name for p in keep.iterdir()) == sorted(files)
    assert not killed.exists()  # what a killed build left is still removed


def test_a_file_named_like_a_staging_directory_does_not_break_a_build(tmp_path):
    """Mutant: ``entry.is_dir()`` dropped from clear_leftovers: a plain file so named made every build fail
    (NotADirectoryError from iterdir)."""
    (tmp_path / ".staging-abcdefgh").write_text("a file")
    with bundle_dir.build_lock(tmp_path):
        pass
    assert (tmp_path / ".staging-abcdefgh").is_file()


def test_without_flock_a_build_removes_no_staging_directory(tmp_path, monkeypatch):
    """Mutant: ``_flock`` returning True when flock fails (NFS): unlocked, the staging directory may be another
    build's, live, and the mutant deleted it."""
    live = _staging_like(tmp_path, ".staging-l1ve_abc", {"base.onnx": b"x"})

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(bundle_dir.fcntl, "flock", no_flock)
    with bundle_dir.build_lock(tmp_path):
        pass
    assert (live / "base.onnx").is_file()


def _in_thread(work, timeout: float = 5.0) -> bool:
    """Whether ``work`` finished within ``timeout`` seconds in another thread."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    thread.start()
    return done.wait(timeout)


def test_two_loads_of_one_bundle_do_not_wait_for_each_other(tmp_path):
    """Mutant: LOCK_EX for LOCK_SH in read_lock: loads (two replicas starting) queued behind each other."""
    def second_load():
        with bundle_dir.read_lock(tmp_path):
            pass

    with bundle_dir.read_lock(tmp_path):
        assert _in_thread(second_load, timeout=2.0)


def test_a_load_that_waits_for_a_build_says_so(tmp_path, caplog):
    """Mutant: a blocking flock without LOCK_NB first: a server's start-up held by a stopped build waited without a
    word in its log."""
    def load():
        with bundle_dir.read_lock(tmp_path):
            pass

    def logged_wait() -> bool:
        return any("waits for a build" in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.WARNING, logger="certserve.bundle")
    fd = bundle_dir.os.open(tmp_path, bundle_dir.os.O_RDONLY)
    loader = threading.Thread(target=load, daemon=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a "build" holds the lock
        loader.start()
        for _ in range(100):  # up to 5 s for the load to say that it waits
            if logged_wait() or not loader.is_alive():
                break
            threading.Event().wait(0.05)
        assert loader.is_alive()  # still waiting for the lock
    finally:
        bundle_dir.os.close(fd)  # releases it: the load goes on
    loader.join(5)
    assert logged_wait() and not loader.is_alive()


def test_a_bundle_path_that_is_a_file_is_a_bundle_error(tmp_path):
    """Mutant: read_lock catching FileNotFoundError only: a bundle path naming a file raised NotADirectoryError (a
    traceback at start-up) instead of BundleError's one line."""
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "not-a-dir")


def test_a_bundle_is_loaded_for_recalibration_without_its_calibration_block(tmp_path):
    """Mutant: the calibration dropped for schema 1 only (``found == 1`` for ``found in (1, SCHEMA_VERSION)``): a
    current bundle whose calibration block is broken or missing could not be recalibrated, which is what
    ``certserve calibrate conformal`` is for."""
    import shutil

    root = shutil.copytree(DEFAULT_BUNDLE_DIR, tmp_path / "bundle")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["calibration"] = {"method": "probit-mondrian"}  # no levels: refused for serving
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle schema"):
        load_bundle(root, check_models=False)
    assert load_bundle(root, check_models=False, for_recalibration=True).manifest.calibration is None
def test_a_repeated_key_error_names_exactly_the_repeated_keys():
    """Mutants: the seen/repeated sets swapped (every key named, the repeated one lost among them) and ``[:1]`` for
    ``[:10]`` (only the first of two repeated keys named)."""
    with pytest.raises(RepeatedKey) as info:
        json.loads('{"alpha": 1, "mode": "x", "radius": 2, "alpha": 3, "radius": 4}', object_pairs_hook=unique_keys)
    assert str(info.value) == "alpha, radius"
    assert unique_keys([("a", 1), ("b", 2)]) == {"a": 1, "b": 2}


# -------------------------------------------------------------------------------------------------- models.export
class _ExportsOneRow(torch.nn.Module):
    """A constant output whose exported graph keeps only the first row: right at batch 1, wrong at any other."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.arange(3, dtype=torch.float32))

    def forward(self, x):
        out = self.bias.expand(x.shape[0], 3) + 0 * x.flatten(1)[:, :1]
        return out[:1] if torch.onnx.is_in_onnx_export() else out


def test_an_export_without_a_working_batch_axis_is_refused(tmp_path):
    """Mutants: only batch 1 checked (``(1,)`` for ``(1, 7)``), and the shape comparison dropped (np.allclose
    broadcasts the exported (1, 3) against torch's (7, 3)): an ONNX file that answers one row per batch was
    accepted, and the engine would have read one certificate's counts for seven samples."""
    with pytest.raises(RuntimeError, match="does not match torch"):
        export_onnx(_ExportsOneRow(), torch.zeros(1, 4), tmp_path / "one-row.onnx")


class _ExportsOffByOneThousandth(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        out = self.linear(x)
        return out + 1e-3 if torch.onnx.is_in_onnx_export() else out


def test_an_export_that_differs_from_torch_by_a_thousandth_is_refused(tmp_path):
    """Mutant: atol 1e-2 for 1e-4: logits 1e-3 away from the trained model's (enough to flip close arg-maxes under
    noise) were accepted."""
    with pytest.raises(RuntimeError, match="does not match torch"):
        export_onnx(_ExportsOffByOneThousandth(), torch.zeros(1, 4), tmp_path / "off.onnx")


def test_an_export_is_checked_in_eval_mode(tmp_path):
    """Mutant: ``module.cpu()`` for ``module.eval().cpu()``: torch's reference ran with dropout on, so a model with
    dropout (trained, then exported in train mode) failed its own check; eval mode passes and drops nothing."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).train()
    path = export_onnx(module, torch.zeros(1, 4), tmp_path / "dropout.onnx")
    assert path.is_file() and not module.training


# ------------------------------------------------------------------------------------------------ models.networks
def test_small_cnn_normalizes_by_its_mean_and_std(tmp_path):
    """Mutant: ``(x - mean) * std`` for ``(x - mean) / std``: the exported model saw other inputs than the ones
    it was trained on whenever std != 1 (the default 0.5 included)."""
    torch.manual_seed(0)
    normalizing = SmallCNN(1, 4, 8, 8, mean=0.3, std=0.2, width_mult=2, hidden=8).eval()
    plain = SmallCNN(1, 4, 8, 8, mean=0.0, std=1.0, width_mult=2, hidden=8).eval()
    plain.load_state_dict({**normalizing.state_dict(), "mean": plain.mean, "std": plain.std})
    x = torch.rand((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(normalizing(x), plain((x - 0.3) / 0.2))


def test_small_cnn_takes_images_that_are_not_square():
    """Mutant: the dense layer sized ``(height // 4) * (height // 4)`` (an axis swapped): a 12 x 20 input failed."""
    net = SmallCNN(1, 5, 12, 20, width_mult=2, hidden=8).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 12, 20)).shape == (2, 5)


def _meta_with_outputs(mean_logit: float, strength_logit: float) -> torch.Tensor:
    """The (a, b) a MetaPrior gives when its last layer outputs (mean_logit, strength_logit) for any input."""
    net = MetaPrior()
    last = net.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([mean_logit, strength_logit]))
        return net(torch.zeros(1, 4))[0]


def test_meta_prior_is_a_proper_beta_with_bounded_strength():
    """Mutants: the mean's clamp to [1e-4, 1 - 1e-4] dropped (a saturated sigmoid gave b = 0: no Beta prior), the
    strength's cap at max_strength dropped (unbounded: a wrong prior could cost unbounded power), and
    min_strength left out of the strength (a prior of strength ~0)."""
    a, b = _meta_with_outputs(100.0, 0.0)
    assert a > 0 and b > 0
    a, b = _meta_with_outputs(0.0, 1e4)
    assert float(a + b) == pytest.approx(2000.0)
    a, b = _meta_with_outputs(0.0, -100.0)
    assert float(a + b) == pytest.approx(1.0)


def test_meta_prior_puts_its_mean_on_a():
    """Mutant: ``stack([(1 - mu) k, mu k])``: a and b swapped, a prior of pA around 1 - mu instead of mu."""
    a, b = _meta_with_outputs(2.0, 3.0)
    assert float(a / (a + b)) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))), rel=1e-5)
