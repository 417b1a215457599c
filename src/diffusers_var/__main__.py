"""``python -m diffusers_var ...`` is the ``diffusers-var`` command."""

from .cli import main

if __name__ == "__main__":
    main()
