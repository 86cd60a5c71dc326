"""On-device training: training bundles run by plain onnxruntime."""
