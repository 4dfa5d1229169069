import pytest

from minitrain.ops.rmsnorm import RMSNorm


@pytest.fixture
def rmsnorm_without_mean_term(monkeypatch):
    """A realistic planted bug: RMSNorm's backward forgets that r depends on x."""

    def no_mean(self, g):
        xhat, r, w = self.saved
        return g * w * r, (g * xhat).reshape(-1, w.shape[0]).sum(axis=0)

    monkeypatch.setattr(RMSNorm, "backward", no_mean)


def pytest_terminal_summary(terminalreporter):
    """ptxas's register and spill counts of every kernel compiled by tests/test_kernels_compile.py."""
    from test_kernels_compile import REPORT

    if REPORT:
        terminalreporter.section("CUDA kernels: ptxas -v (registers, spill stores/loads in bytes)")
        for source, arch, kernel, regs, st, ld in REPORT:
            terminalreporter.write_line(f"{source:<16} {arch}  {kernel:<40} {regs:>3} registers  spills {st}/{ld}")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF (tools/fetch_smollm2.py: downloaded once, cached).
    Without it the tests that need it are skipped, with the reason in the summary: never passed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fetch_smollm2", Path(__file__).parent.parent / "tools" / "fetch_smollm2.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        return tool.fetch()
    except RuntimeError as e:
        pytest.skip(f"REAL-MODEL TESTS NOT RUN: SmolLM2-135M could not be fetched ({e})")
