"""Dataset preparation: TFDS builders writing ArrayRecord (`python -m data_prep ...`, docs/data.md)."""
