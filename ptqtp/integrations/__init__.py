"""Adapters that let other engines run ptqtp checkpoints; each module imports its engine, this package nothing.

`import ptqtp` never imports this package, so no engine is ever a dependency of ptqtp.
"""
