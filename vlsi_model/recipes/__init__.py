"""Recipes that need more than `vlsi train`'s YAML can express (data mixes, partial freezing)."""
