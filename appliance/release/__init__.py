"""Releases on a device: offline bundles verified and installed side by side, switched and rolled back."""
