"""Offline builders of tiny, randomly initialised SDXL pipelines for the diffusers backend tests.

Needs diffusers (plus torch, transformers, peft); import it only after
`pytest.importorskip("diffusers")`.
"""
