"""The reference index: store, search, EWC over it, data sets, embedding cache, evaluation, tuning, reports."""
