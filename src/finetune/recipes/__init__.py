"""Recipes: one module each, a `run(params) -> float` function holding the whole run."""
