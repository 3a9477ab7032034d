"""TopK SAE: sparsity, training, reconstruction vs PCA, persistence, determinism, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import dead_share, factor_counts
from saelect.workers.sae import SAEConfig, TopKSAE, default_units
from saelect.workers.sae_encode import encode
from saelect.workers.sae_files import load_sae, save_sae
from saelect.workers.sae_fit import FiringCounters, fit_sae, sae_train_step

from tests.conftest import DIGITS_SAE_CONFIG

K = DIGITS_SAE_CONFIG["k"]
UNITS = DIGITS_SAE_CONFIG["units"]


def _synthetic(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    """float32 (n, d): a sparse mixture of 48 random directions plus noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, d))
    mix = rng.exponential(size=(n, 48)) * (rng.random((n, 48)) < 0.1)
    return (mix @ atoms + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


SMALL = SAEConfig(units=64, k=4, epochs=3, batch_size=128)


def test_codes_hold_k_distinct_units_per_sample(digits_sae: Any, digits_features: np.ndarray):
    codes = encode(digits_sae.model, digits_features, batch_size=500)
    n = digits_features.shape[0]
    assert codes.ids.shape == (n, K) and codes.values.shape == (n, K)
    assert codes.ids.dtype == np.int32 and codes.values.dtype == np.float16
    sorted_ids = np.sort(codes.ids, axis=1)
    assert (np.diff(sorted_ids, axis=1) > 0).all(), "ids repeat within a row"
    assert (codes.ids >= 0).all() and (codes.ids < UNITS).all()
    assert (codes.values >= 0).all()
    assert (np.diff(codes.values.astype(np.float32), axis=1) <= 0).all(), "not value-descending"
    active = (codes.values > 0).sum(axis=1)
    assert active.max() <= K
    assert np.mean(active == K) > 0.99  # TopK: k active units, barring non-positive pre-acts
    # the dense code of the model has the same nonzeros
    with torch.no_grad():
        dense = digits_sae.model.pre_acts(
            digits_sae.model.standardize(torch.from_numpy(digits_features))
        )
    top = torch.topk(dense, K, dim=1).indices.numpy()
    assert np.array_equal(np.sort(top, axis=1), sorted_ids)


def test_reconstruction_loss_falls(digits_sae: Any) -> None:
    losses = digits_sae.losses
    assert len(losses) == DIGITS_SAE_CONFIG["epochs"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_beats_pca_with_the_same_number_of_nonzeros(
    digits_sae: Any, digits_features: np.ndarray
) -> None:
    model = digits_sae.model
    with torch.no_grad():
        out = model(torch.from_numpy(digits_features))
        x = model.standardize(torch.from_numpy(digits_features)).numpy().astype(np.float64)
    sae_mse = float(out.mse)
    # PCA with k components (k nonzero coefficients per sample) on the same standardized data
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    recon = xc @ vt[:K].T @ vt[:K]
    pca_mse = float(((recon - xc) ** 2).mean())
    assert sae_mse < 0.8 * pca_mse, (sae_mse, pca_mse)


def test_decoder_directions_have_unit_norm(digits_sae: Any) -> None:
    norms = digits_sae.model.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_dead_share_is_reported_in_unit_interval(
    digits_sae: Any, digits_features: np.ndarray
) -> None:
    assert 0.0 <= digits_sae.dead_share <= 1.0
    codes = encode(digits_sae.model, digits_features)
    assert digits_sae.dead_share == dead_share(codes, UNITS)
    assert digits_sae.dead_share == float(np.mean(factor_counts(codes, UNITS) == 0))


def test_save_load_round_trip_is_bit_exact(
    digits_sae: Any, digits_features: np.ndarray, tmp_path: Path
) -> None:
    model = digits_sae.model
    save_sae(model, tmp_path, SAEConfig(**DIGITS_SAE_CONFIG))
    assert {p.name for p in tmp_path.iterdir()} == {"sae.safetensors", "sae.json"}
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, TopKSAE) and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert encode(model, digits_features).equals(encode(loaded, digits_features))


def test_same_seed_same_model_other_seed_differs() -> None:
    x = _synthetic()
    fit_a = fit_sae(x, SMALL, progress=False)
    fit_b = fit_sae(x, SMALL, progress=False)
    fit_c = fit_sae(x, SAEConfig(**{**SMALL.__dict__, "seed": 1}), progress=False)
    for name, t in fit_a.model.state_dict().items():
        assert torch.equal(t, fit_b.model.state_dict()[name]), name
    assert fit_a.losses == fit_b.losses
    assert encode(fit_a.model, x).equals(encode(fit_b.model, x))
    assert not torch.equal(fit_a.model.W_dec, fit_c.model.W_dec)
    assert not encode(fit_a.model, x).equals(encode(fit_c.model, x))


def test_encode_is_independent_of_batch_size() -> None:
    x = _synthetic(n=300)
    model = fit_sae(x, SMALL, progress=False).model
    whole = encode(model, x, batch_size=300)
    parts = SparseCodes.concat([encode(model, x[:100], batch_size=7), encode(model, x[100:])])
    assert np.array_equal(whole.ids, parts.ids)
    assert np.allclose(whole.values.astype(np.float32), parts.values.astype(np.float32), atol=1e-2)


def test_relu_l1_codes_keep_top_k_values() -> None:
    x = _synthetic()
    cfg = SAEConfig(units=64, k=4, epochs=4, batch_size=128, activation="relu_l1")
    fit = fit_sae(x, cfg, progress=False)
    assert fit.losses[-1] < fit.losses[0]
    codes = encode(fit.model, x)
    assert codes.ids.shape == (x.shape[0], 4) and (codes.values >= 0).all()
    with torch.no_grad():
        z = torch.relu(fit.model.pre_acts(fit.model.standardize(torch.from_numpy(x))))
    kth = torch.topk(z, 4, dim=1).values[:, -1].numpy()
    assert np.allclose(codes.values[:, -1].astype(np.float32), kth, rtol=1e-2, atol=1e-3)


def test_auxk_trains_dead_units_only_through_the_aux_loss() -> None:
    x = torch.from_numpy(_synthetic(n=256))[:8]  # 8 x k=4 ids: most units stay silent
    cfg = SAEConfig(units=64, k=4, dead_steps=2, aux_coef=1.0, normalize_decoder=False)

    def enc_grad(dead_steps_ago: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-unit W_enc gradient norms (M,), bool (M,) units that fired on the batch)."""
        model = TopKSAE(16, 64, 4, seed=3)
        with torch.no_grad():
            model.mean_D.copy_(x.mean(0))
            model.std_D.copy_(x.std(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves weights alone
        counters = FiringCounters(64)
        counters.steps_M.fill_(dead_steps_ago)
        # which units fire on this batch
        with torch.no_grad():
            fired = torch.zeros(64, dtype=torch.bool)
            fired[model.encode_topk(x).top_indices_BK.reshape(-1)] = True
        sae_train_step(model, opt, x, cfg, counters=counters)
        assert model.W_enc.grad is not None
        return model.W_enc.grad.norm(dim=1), fired

    g_alive, fired = enc_grad(0)  # nobody dead: no AuxK
    g_dead, _ = enc_grad(5)  # everybody dead: AuxK reaches units that did not fire
    silent = ~fired
    assert silent.any()
    assert torch.all(g_alive[silent] == 0)
    assert torch.any(g_dead[silent] > 0)


def test_default_units_and_validation() -> None:
    assert default_units(256) == 2048 and default_units(4096) == 16384
    assert SAEConfig().units_for(64) == 512
    with pytest.raises(ValueError, match="k"):
        SAEConfig(k=0)
    with pytest.raises(ValueError, match="k=8 > units=4"):
        SAEConfig(units=4, k=8)
    with pytest.raises(ValueError, match="activation"):
        SAEConfig(activation="gelu")
    with pytest.raises(ValueError, match="lr"):
        SAEConfig(lr=0.0)
    with pytest.raises(ValueError, match="k=32 > units=8"):  # default M = 8 d = 8 for d = 1
        fit_sae(np.ones((10, 1), np.float32), SAEConfig(), progress=False)
    bad = _synthetic(n=50)
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        fit_sae(bad, SMALL, progress=False)
    model = TopKSAE(16, 64, 4)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        encode(model, np.zeros((5, 15), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        encode(model, bad)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        model(torch.zeros(3, 17))


def test_bfloat16_encode_keeps_k_ids_and_agrees_with_float32(
    digits_features: np.ndarray, tmp_path: Path
) -> None:
    """The fast bf16 path: exactly k distinct ids, values >= 0, ids ~ those of float32, and the
    choice survives save/load (it is part of the saved model)."""
    cfg32 = SAEConfig(units=128, k=8, epochs=2, batch_size=512, seed=3)
    cfg16 = dataclasses.replace(cfg32, encode_dtype="bfloat16")
    m32 = fit_sae(digits_features, cfg32, progress=False).model
    m16 = fit_sae(digits_features, cfg16, progress=False).model
    assert m16.encode_dtype == "bfloat16" and m32.encode_dtype == "float32"
    c32, c16 = encode(m32, digits_features), encode(m16, digits_features)
    assert c16.ids.shape == c32.ids.shape == (digits_features.shape[0], 8)
    assert all(len(set(row)) == 8 for row in c16.ids.tolist())
    assert (c16.values >= 0).all()
    same = np.mean(
        [len(set(a) & set(b)) / 8 for a, b in zip(c32.ids.tolist(), c16.ids.tolist(), strict=True)]
    )
    assert same > 0.9, same  # same weights (same seed), only the compute dtype differs
    save_sae(m16, tmp_path / "sae16", cfg16)
    loaded = load_sae(tmp_path / "sae16")
    assert loaded.encode_dtype == "bfloat16"
    assert np.array_equal(encode(loaded, digits_features).ids, c16.ids)
    with pytest.raises(ValueError, match="encode_dtype"):
        SAEConfig(encode_dtype="float64")
