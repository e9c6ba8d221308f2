"""The model folders: each is the complete Hub remote-code payload of one model."""
