"""Moving trained models onto the device: checkpoints and their formats."""
