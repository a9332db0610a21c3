"""Email backends that Kipekee ships as providers."""
