"""One module per op: its torch.library custom ops, autograd and backend dispatch."""
