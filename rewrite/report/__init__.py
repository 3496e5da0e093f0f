"""Reports as data first (JSON), text second."""
