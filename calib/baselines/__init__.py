"""Baseline PTQ methods for the comparison with OuroMamba: PTQ4VM, QMamba, min-max and percentile.

Each method module registers its recipe parameters and its calibration function with the
quantization core (`ouro.calib.quant`), so `--method ptq4vm|qmamba|minmax|percentile` resolves to it.

Model families other than Vim (VMamba): the baselines' papers say nothing about VMamba's extra layers,
so every method (OuroMamba included) treats them alike: the 2-D depthwise conv (conv2d), every
LayerNorm (the SS2D out_norm included), the downsampling layers, patch embed and classifier stay FP
(`ouro.recipes.EXCLUDED_MODULES`, one list for all methods); the MLP's fc1 / fc2 are linears like the
mixer's (in the recipes' default `linear_layers`); per-direction x_proj_k / dt_proj_k are selected by
their kind (x_proj, dt_proj); each of the four scan directions gets its own SSM-operand quantizers,
whose per-token tables index that direction's own token order (ouro.calib.families.vmamba).
"""
