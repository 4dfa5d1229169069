"""The GPU path: raw CUDA kernels (kernels/*.cu) and how to launch them.

Each topic module (swiglu.py, ...) holds backend-agnostic launch functions: given arrays, they
choose the kernel variant, the grid and the block, and call a `launch(source, kernel, grid,
block, args)` callable. runtime.py provides that callable for CuPy (cupy.RawModule, compiled once
and cached); the tests provide one that runs the same kernels on the CPU through
kernels/cuda_emu.h. So the launch configuration the GPU uses is the one the CPU tests check.

Argument conventions for every kernel: arrays are C-contiguous device arrays (float32, or
bfloat16 stored as uint16 raw bits), integers are C `long`, floats are C `float`.
"""
