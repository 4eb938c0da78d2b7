"""Networks: specs in the reference's layer grammar, their builders, and the PyTorch modules made from them."""
