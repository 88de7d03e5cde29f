"""The model core: image bytes → decoded input → MobileNetV2 forward pass (ONNX Runtime or Keras) → 1280 floats,
and its verified weights."""
