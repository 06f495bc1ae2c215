"""Recipes: one module each, named as its `conf/recipe/` option and registered in
`config.RECIPES`, whose `run(params) -> float` outlines the run around the shared loop."""
