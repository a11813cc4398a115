"""Host-side adapters of the runtime that need torch: ``torch_unet.EngineUNet``, a diffusers-compatible UNet
stand-in that runs an engine. The torch-free runtime itself is the ``quest_export_runtime`` package
(distribution ``quest-export-runtime``, source in runtime/python/).
"""
