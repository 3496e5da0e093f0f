"""Models exported from the libraries users use (torch TorchScript and dynamo exporters; transformers, diffusers, timm), built from config objects with random weights."""
