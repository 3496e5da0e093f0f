"""Canonicalisation, run by every entry point before diagnosis and rewrites: constant folding of shape arithmetic with the feeds' shapes, concrete shapes, no-op Casts removed, unique names."""
