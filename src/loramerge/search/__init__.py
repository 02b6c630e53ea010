"""Gradient-free search of a recipe's merge weights (and method parameters) on small dev sets, with
candidates evaluated in parallel by local worker processes or a Ray cluster (``loramerge search``)."""
