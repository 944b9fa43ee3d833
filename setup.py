from setuptools import setup

setup(
    name="gpu-momentum",
    version="0.1.0",
    description="The momentum-SGD update in one fused pass over a flat parameter buffer: "
                "CUDA C through CuPy, Numba CUDA, and a parallel Numba CPU fallback.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gpu_momentum", "gpu_momentum.backends", "gpu_momentum.kernels",
              "gpu_momentum.bench"],
    package_dir={"gpu_momentum": "gpu_momentum", "gpu_momentum.kernels": "kernels",
                 "gpu_momentum.bench": "bench"},
    package_data={"gpu_momentum.kernels": ["*.cu", "*.cuh"]},
    install_requires=["numpy>=1.24", "numba>=0.59"],
    extras_require={
        "cuda12": ["cupy-cuda12x>=13", "numba-cuda[cu12]>=0.20"],
        "cuda13": ["cupy-cuda13x>=13.6", "numba-cuda[cu13]>=0.20"],
        "test": ["pytest>=7"],
        "bench": ["tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["gpu-momentum=gpu_momentum.cli:main"]},
)
