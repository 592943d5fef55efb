"""The names of the soups and ensembles ``cook`` can make (importable without torch, for the command line)."""

SOUPS = ("uniform", "greedy", "learned")
ENSEMBLES = ("ensemble", "prob_ensemble", "vote", "greedy_ensemble", "stacking")
RECIPES = SOUPS + ENSEMBLES
