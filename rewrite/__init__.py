"""onnx-fp16-rewrite: rewrite ONNX graphs so that FP16 inference stays finite and accurate.

Public API (kept small on purpose): load/save models, the pass manager, the FP16 check.
Import submodules directly for the rest (``rewrite.fp16_emulation``, ``rewrite.mixed_precision`` ...).
"""

__version__ = "0.1.0"
