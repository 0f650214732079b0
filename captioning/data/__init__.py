"""Files in, arrays out: caption text, features files, images, training batches (no networks)."""
