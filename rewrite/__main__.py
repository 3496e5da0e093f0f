"""``python -m onnx_fp16_rewrite``: the same command line as ``onnx-rewrite``."""

import sys

from onnx_fp16_rewrite.cli import main

sys.exit(main())
