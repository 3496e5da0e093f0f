"""Recognisers of meaning (integral images, normalizations) shared by the passes."""
