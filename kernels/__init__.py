"""Triton kernels and their PyTorch reference twins, installed as `dit_accel.kernels`.

Each kernel file holds the `@triton.jit` code and a small launcher with shape checks; its
reference twin (same signature) lives beside it and is the oracle for tests. The dense path of
this version uses torch's and the peers' kernels (see `dit_accel.backends`)."""
