"""The CPU model of an FP16 engine (FP16 storage, FP32 compute) and the graph edits it is made of."""
