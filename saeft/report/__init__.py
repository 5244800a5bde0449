"""The report's building blocks, torch-free at import: the tidy results table, intervals and
calibration criteria, and the paper's tables and figures (the ``aggregate`` stage writes them)."""
