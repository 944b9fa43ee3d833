"""Every kernel of gpu-momentum. Installed as `gpu_momentum.kernels` (see setup.py).

Backends import their kernel module lazily, so importing this package needs neither CUDA
nor a GPU.
"""
