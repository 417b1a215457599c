"""Schedulers of diffusers-var."""
