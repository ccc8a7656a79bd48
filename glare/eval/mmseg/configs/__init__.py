"""mmsegmentation configs of the downstream protocol (mmengine config files, not imported as modules).

``<head>_<dataset>.py`` are the runnable configs; ``_*.py`` are the shared parts they inherit:
``_runtime.py`` (hooks, AdamW with layer-wise lr decay, IoU evaluation), ``_upernet.py`` /
``_fpn.py`` (model), ``_dataloaders.py`` (the loaders' shared settings) and ``_<dataset>.py`` (data
pipeline, batch size and schedule). This file makes the folder a
package so the configs ship with ``pip install``.
"""
