"""Images -> features: the backbones (VGG16, EfficientNet-Lite0), their weights, extraction, runtimes."""
