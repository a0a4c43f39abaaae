"""benchmarks/studies/drift_floor.py's weight changes: each is the size it claims, measured in numpy."""

import numpy as np
import pytest

from benchmarks.studies.drift_floor import params, perturbed, relative_change
from cllm_jax.weights.load import load_model
from tests.tiny import torch_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch_model("llama").save_pretrained(path)
    return path


def test_bf16_rounding_moves_each_weight_by_at_most_its_unit_roundoff(tiny_path):
    base = load_model(tiny_path).model
    rounded = perturbed(tiny_path, "bf16")
    for w, v in zip(params(base), params(rounded), strict=True):
        w, v = np.asarray(w), np.asarray(v)
        assert v.dtype == np.float32  # rounded values, still computed in fp32
        assert np.all(np.abs(v - w) <= 2.0**-8 * np.abs(w))  # bf16 keeps 8 significant bits
    change = relative_change(rounded, base)
    assert 0 < change <= 2.0**-8


@pytest.mark.parametrize("eps", [1e-3, 3e-2])
def test_noise_of_scale_eps_changes_the_weights_by_eps(tiny_path, eps):
    base = load_model(tiny_path).model
    noisy = perturbed(tiny_path, "noise", eps)
    flat = lambda m: np.concatenate([np.asarray(w).ravel() for w in params(m)])  # noqa: E731
    w, v = flat(base), flat(noisy)
    expected = np.linalg.norm(v - w) / np.linalg.norm(w)
    assert relative_change(noisy, base) == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(eps, rel=0.1)  # E|w * eps * z|^2 = eps^2 |w|^2
    assert relative_change(load_model(tiny_path).model, base) == 0.0
