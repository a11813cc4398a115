"""Engine builders and on-device bundles (deploy.md sections 6, 7 and B-14).

``trt``: TensorRT build plans, ``trtexec`` command lines, the Python build path and the layer audit.
``bundle``: the folder that builds its engine on the device. Neither imports torch, diffusers or any
quest_export stage, and ``tensorrt`` is imported only when an engine is actually built.
"""
