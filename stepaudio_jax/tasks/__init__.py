"""Training tasks: what each phase trains and on what (base.py), one file per phase, and the
registry that maps the config's `task:` to them."""
