"""Test and demo models made locally (tiny, shaped, the real pair) and the transformers reference."""
