"""Tensor-parallel builds: each rank's program exported from a model whose linears hold that rank's slices."""
