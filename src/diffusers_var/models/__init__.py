"""Models of diffusers-var. Module paths are recorded in saved pipelines: do not move these classes."""
