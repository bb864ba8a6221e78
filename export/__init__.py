"""Moving models onto the device: model files, ONNX step graphs, ONNX Runtime / TensorRT runners,
bundles, hybrid deploy, and importers from other SNN libraries."""
