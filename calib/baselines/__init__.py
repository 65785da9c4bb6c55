"""Baseline PTQ methods for the comparison with OuroMamba: PTQ4VM, QMamba, min-max and percentile.

Each method module registers its recipe parameters and its calibration function with the
quantization core (`ouro.calib.quant`), so `--method ptq4vm|qmamba|minmax|percentile` resolves to it.
"""
