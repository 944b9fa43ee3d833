from setuptools import setup

setup(
    name="gpu-momentum",
    version="0.1.0",
    description="The momentum-SGD update in one fused pass over a flat parameter buffer: "
                "CUDA C through CuPy, Numba CUDA, and a parallel Numba CPU fallback.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gpu_momentum", "gpu_momentum.backends", "gpu_momentum.checkpoint",
              "gpu_momentum.kernels", "gpu_momentum.bench"],
    package_dir={"gpu_momentum": "gpu_momentum", "gpu_momentum.kernels": "kernels",
                 "gpu_momentum.bench": "bench"},
    package_data={"gpu_momentum.kernels": ["*.cu", "*.cuh"]},
    install_requires=["numpy>=1.24", "numba>=0.59"],
    extras_require={
        # NCCL: ShardedMomentumSGD's collectives between GPUs (CuPy's own hint: >= 2.27.7).
        "cuda12": ["cupy-cuda12x>=13", "numba-cuda[cu12]>=0.20", "nvidia-nccl-cu12>=2.27.7"],
        "cuda13": ["cupy-cuda13x>=13.6", "numba-cuda[cu13]>=0.20",
                   "nvidia-nccl-cu13>=2.27.7,<3"],
        # gpu_momentum.distributed. mpi4py 4.1 is the first with binary wheels and finds
        # the MPI library at run time; the mpich wheel brings libmpi and mpiexec where it
        # exists (Linux x86_64 and aarch64, macOS). Clusters with their own MPI (Open MPI,
        # Cray MPICH, Intel MPI) take "mpi-system": the mpich wheel in the environment
        # would shadow theirs (or set MPI4PY_LIBMPI to the system libmpi).
        "mpi": ["mpi4py>=4.1",
                "mpich>=5.0; sys_platform == 'darwin' or (sys_platform == 'linux' and "
                "(platform_machine == 'x86_64' or platform_machine == 'aarch64'))"],
        "mpi-system": ["mpi4py>=4.1"],
        # bfloat16 parameters: ml_dtypes' NumPy bfloat16 (the one JAX and CuPy 14 use).
        "bf16": ["ml_dtypes>=0.4"],
        "test": ["pytest>=7"],
        "bench": ["tqdm", "matplotlib"],
        "torch": ["torch>=2.4"],
    },
    entry_points={"console_scripts": ["gpu-momentum=gpu_momentum.cli:main"]},
)
