"""Samples -> tokens -> packed micro-batches."""
