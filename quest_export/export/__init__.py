"""QDQ ONNX export of a fake-quant checkpoint, graph checks against the target's rules (``lint``), and recording
of reference inputs and outputs. Imports stay lazy: ``quest_export.export.lint`` needs no torch."""
