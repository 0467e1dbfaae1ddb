"""flux-remote's agent: shipped to the GPU instance and run there as ``python -m remote``.

It never imports ``controller`` and needs only what a CUDA PyTorch image has plus pyyaml, pillow,
numpy and safetensors. Stages: checks, bootstrap, ingest, caption, quality gate, config, train,
validate, publish (see ``remote.runner``).
"""

__version__ = "0.1.0"
