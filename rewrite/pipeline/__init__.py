"""Pass infrastructure: the Pass base, its context, the registry, the pass manager (snapshot, check, validate, roll back) and FP32 validation."""
