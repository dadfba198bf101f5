"""Built-in polytope configs, shipped as package data (``convex_sst.polytopes``)."""
