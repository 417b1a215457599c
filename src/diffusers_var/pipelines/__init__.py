"""Pipelines of diffusers-var."""
