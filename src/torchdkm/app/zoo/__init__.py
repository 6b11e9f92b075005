"""The built-in models and datasets that recipes name (``model.name: resnet_small``, ``data.name: digits``)."""
