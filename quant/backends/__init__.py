"""Compiled kernel backends. Each module registers a loader with `quant.kernels`; nothing is built
until the first layer on its device is prepared."""
