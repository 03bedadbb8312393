"""The serving runtime: a model bundle made ready to run, whoever runs it (the Python API, the
batch runner, the Ray model actors, ``pacs listen``).

- :mod:`.backends`: one interface over ONNX Runtime, TorchScript and eager PyTorch, and the choice
  of device (CUDA only when it really works here).
"""
