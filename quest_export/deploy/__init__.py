"""Engine builders and on-device bundles, host side (deploy.md sections 6, 7 and B-14).

``plan``: TensorRT build plans per target. ``trtexec``: their ``trtexec`` command lines. ``bundle``: the folder
that builds its engine on the device. ``ort``: ONNX Runtime engine folders. None imports torch, diffusers or any
quest_export stage; the device half (builder, timing cache, layer audit, device rules) is ``quest_export_runtime``.
"""
