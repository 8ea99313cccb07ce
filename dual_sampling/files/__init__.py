"""Data on disk: prompt and text inputs, the exactly-once records, top-k datasets, run locks."""
