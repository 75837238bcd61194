"""Triton kernels and their PyTorch reference twins, installed as `dit_accel.kernels`.

Each kernel file holds the `@triton.jit` code and a small launcher with shape checks; its
reference twin (same signature) lives beside it and is the oracle for tests. The dense path uses
torch's and the peers' kernels (see `dit_accel.backends`).

* `block_sparse`: forward attention over a compact per-query-tile list of key tiles
  (`block_sparse_attention`, its twin `block_sparse_attention_reference`, layout helpers)."""
