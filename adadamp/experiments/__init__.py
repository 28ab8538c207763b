"""Reproducible experiment definitions: offline data sets and small models."""
