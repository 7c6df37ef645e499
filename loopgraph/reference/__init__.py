"""An independent PyTorch implementation of inner looping, used to verify the graphs (needs torch)."""
