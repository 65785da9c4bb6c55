"""Polygraphy integration: runners that know ouro's custom ops, and the `polygraphy run` extension.

Python API:
    OnnxrtRunner(SessionFromOuroOnnx("model.onnx"))   onnxruntime with ouro's reference custom ops
    TorchRunner(model)                                the PyTorch model (FP or fake-quant), on its own device

CLI (entry point `polygraphy.run.plugins` -> `export_argument_groups`):
    polygraphy run model.onnx --ouro-onnxrt [--onnxrt ...]
Polygraphy's stock `--onnxrt` runner cannot load custom-domain nodes; `--ouro-onnxrt` is the same
runner with the session created by `ouro.exporter.onnxruntime_session`.
"""
from __future__ import annotations

import time
from collections import OrderedDict

from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.tools.args import ModelArgs
from polygraphy.tools.args.base import BaseRunnerArgs
from polygraphy.tools.script import make_invocable

__all__ = ["SessionFromOuroOnnx", "TorchRunner", "OuroOnnxrtRunnerArgs", "export_argument_groups"]


class SessionFromOuroOnnx:
    """Lazy loader (Polygraphy style): calling it returns an onnxruntime session with ouro's ops."""

    def __init__(self, model, providers=None) -> None:
        self.model, self.providers = model, providers

    def __call__(self):
        from ouro.exporter.ort_ops import onnxruntime_session

        return onnxruntime_session(self.model, providers=self.providers)


class TorchRunner(BaseRunner):
    """Runs a PyTorch module on the device its parameters are on (Polygraphy's PytRunner always moves
    tensors to CUDA); inputs and outputs are NumPy arrays on the host."""

    def __init__(self, model, input_name: str = "images", output_name: str = "logits", name: str | None = None) -> None:
        super().__init__(name=name, prefix="torch-runner")
        self._model, self._in, self._out = model, input_name, output_name

    def activate_impl(self):
        self.model = self._model() if not hasattr(self._model, "eval") else self._model
        self.model.eval()

    def get_input_metadata_impl(self):
        import numpy as np

        cfg = self.model.cfg
        return TensorMetadata().add(self._in, np.float32, (-1, cfg.in_chans, cfg.img_size, cfg.img_size))

    def infer_impl(self, feed_dict):
        import torch

        from ouro.calib.device import module_device, synchronize

        dev = module_device(self.model)
        x = torch.from_numpy(feed_dict[self._in]).float().to(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = self.model(x)
        synchronize(dev)
        self.inference_time = time.perf_counter() - t0
        return OrderedDict([(self._out, y.float().cpu().numpy())])

    def deactivate_impl(self):
        del self.model


class OuroOnnxrtRunnerArgs(BaseRunnerArgs):
    """ONNX-Runtime with ouro's custom ops: `--ouro-onnxrt`. Depends on: ModelArgs."""

    def get_name_opt_impl(self):
        return "ONNX-Runtime (ouro custom ops)", "ouro-onnxrt"

    def get_extra_help_text_impl(self):
        return "onnxruntime with the ouro reference custom ops (SelectiveScan, OutlierLinear) registered"

    def add_to_script_impl(self, script):
        script.add_import(imports=["OnnxrtRunner"], frm="polygraphy.backend.onnxrt")
        script.add_import(imports=["SessionFromOuroOnnx"], frm="ouro.exporter.polygraphy_ext")
        loader = script.add_loader(make_invocable("SessionFromOuroOnnx", self.arg_groups[ModelArgs].path), "build_ouro_session")
        script.add_runner(make_invocable("OnnxrtRunner", loader))


def export_argument_groups():
    """Entry point `polygraphy.run.plugins`: the argument groups this extension adds to `polygraphy run`."""
    return [OuroOnnxrtRunnerArgs()]
