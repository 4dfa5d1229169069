"""minitrain: a from-first-principles LLM trainer over NumPy (CPU) and CuPy (GPU)."""

__version__ = "0.1.0"
