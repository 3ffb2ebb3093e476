"""Triton kernels for the CUDA path (imported only when running on a GPU, or under TRITON_INTERPRET=1)."""
