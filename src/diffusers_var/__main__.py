"""``python -m diffusers_var ...`` is the ``diffusers-var`` command."""

from .cli import main

main()
