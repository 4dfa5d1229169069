import pytest

from minitrain.ops.rmsnorm import RMSNorm


@pytest.fixture
def rmsnorm_without_mean_term(monkeypatch):
    """A realistic planted bug: RMSNorm's backward forgets that r depends on x."""

    def no_mean(self, g):
        xhat, r, w = self.saved
        return g * w * r, (g * xhat).reshape(-1, w.shape[0]).sum(axis=0)

    monkeypatch.setattr(RMSNorm, "backward", no_mean)
