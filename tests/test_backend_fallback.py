"""No silent fallback: a compiled kernel that rejects an input hands the call to torch, logged once and
counted; an input torch rejects too (a caller's shape error) raises; a broken Triton install is logged."""

from __future__ import annotations

import builtins
import logging
from types import SimpleNamespace

import pytest
import torch

from grit_kernels import _ext, ops
from grit_kernels.ops import _backend, _cpp

LOGGER = "grit_kernels.ops"


@pytest.fixture(autouse=True)
def _fresh_counts():
    ops.reset_fallback_counts()
    yield
    ops.reset_fallback_counts()


def _rejecting_ops(message: str):
    def reject(*args, **kwargs):
        raise RuntimeError(message)

    return SimpleNamespace(
        sum_squares=reject,
        precondition_grafted_=reject,
        kl_clip_update_=reject,
        rank_statistics_=reject,
        rank_statistics_many_=reject,
    )


def _banks(r=4, d_in=6, d_out=5, n=2):
    grads_a = [torch.randn(r, d_in) for _ in range(n)]
    grads_b = [torch.randn(d_out, r) for _ in range(n)]
    spd = torch.randn(n, r, r)
    inv = spd @ spd.transpose(1, 2) + r * torch.eye(r)
    return grads_a, grads_b, inv, inv.clone()


def test_forced_kernel_failure_falls_back_logs_once_and_counts(monkeypatch, caplog):
    monkeypatch.setattr(_cpp, "_ops", lambda: _rejecting_ops("forced: kernel says no"))
    tensors = [torch.randn(3, 4), torch.randn(2, 4)]
    expected = sum(float(t.square().sum()) for t in tensors)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert float(_cpp.sum_of_squares(tensors)) == pytest.approx(expected, rel=1e-6)
        grads_a, grads_b, inv_d, inv_h = _banks()
        want_a, want_b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
        ops.precondition_grafted_(want_a, want_b, inv_d, inv_h, backend="torch")
        _cpp.precondition_grafted_(grads_a, grads_b, inv_d, inv_h)
    assert all(torch.equal(g, w) for g, w in zip(grads_a + grads_b, want_a + want_b))
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 2, [r.getMessage() for r in records]  # once per op, not once per call
    assert "sum_of_squares" in records[0].getMessage() and "forced: kernel says no" in records[0].getMessage()
    assert ops.fallback_counts() == {"cpp:sum_of_squares": 3, "cpp:precondition_grafted_": 1}
    assert ops.fallback_reasons()["cpp:sum_of_squares"] == "forced: kernel says no"


def test_many_groups_fall_back_group_by_group_and_are_counted(monkeypatch):
    monkeypatch.setattr(_cpp, "_ops", lambda: _rejecting_ops("mixed dtypes"))
    monkeypatch.setattr(_cpp, "_rank_statistics_op", None)  # looked up again from _ops(): rejects as well
    r, n = 4, 8
    stat_sum, rows = torch.zeros(2, 2, r, r), torch.zeros(2)
    want_sum, want_rows = stat_sum.clone(), rows.clone()
    groups = [([0], torch.randn(n, r), torch.randn(n, r)), ([1], torch.randn(n, r), torch.randn(n, r))]
    ops.accumulate_rank_statistics_many_(want_sum, want_rows, groups, 0.0, backend="torch")
    _cpp.accumulate_rank_statistics_many_(stat_sum, rows, groups, 0.0)
    assert torch.allclose(stat_sum, want_sum) and torch.equal(rows, want_rows)
    counts = ops.fallback_counts()
    assert counts["cpp:accumulate_rank_statistics_many_"] == 1
    assert counts["cpp:accumulate_rank_statistics_"] == 2


def test_caller_error_raises_and_is_not_counted(monkeypatch, caplog):
    grads_a, grads_b, _, inv_h = _banks()
    wrong = torch.eye(3).expand(2, 3, 3).contiguous()  # rank 3 inverses for rank-4 gradients: a bug
    monkeypatch.setattr(_cpp, "_ops", lambda: _rejecting_ops("forced: shape"))
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(ValueError) as raised:
        _cpp.precondition_grafted_(grads_a, grads_b, wrong, inv_h)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the kernel's error, chained
    assert ops.fallback_counts() == {} and not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.skipif(not _ext.cpu_available(), reason="compiled C++ kernels not available")
def test_caller_error_raises_with_the_real_cpp_kernels():
    grads_a, grads_b, _, inv_h = _banks()
    wrong = torch.eye(3).expand(2, 3, 3).contiguous()
    with pytest.raises((ValueError, RuntimeError)):
        _cpp.precondition_grafted_(grads_a, grads_b, wrong, inv_h)
    assert ops.fallback_counts() == {}


def test_broken_triton_import_is_logged_once(monkeypatch, caplog):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "triton":
            raise OSError("libcuda.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(_backend, "_triton_import_error", None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _backend.triton_available() is False
        assert _backend.triton_available() is False
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "libcuda.so" in records[0].getMessage()
    assert "OSError" in _backend._triton_import_error


def test_missing_triton_is_quiet(monkeypatch, caplog):
    real_import = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'triton'", name="triton")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    monkeypatch.setattr(_backend, "_triton_import_error", None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _backend.triton_available() is False
    assert not [r for r in caplog.records if r.name == LOGGER] and _backend._triton_import_error is None
