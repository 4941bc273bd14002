"""Shared test code: `harness` (synthetic data, tiny method configs, train steps on n devices, tree
comparisons) and `torch_reference` (PyTorch transcriptions used by more than one test file)."""
