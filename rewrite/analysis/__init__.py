"""Range profiling, diagnosis of FP16 failure sites, FP32 regions, the automatic fixer and FLOP accounting."""
