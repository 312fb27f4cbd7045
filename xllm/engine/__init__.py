"""The engine: requests in, scheduled batches through the model, outputs back."""
