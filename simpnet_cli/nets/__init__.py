"""Networks: the supplement's C_x{y} notation, specs in the reference's layer grammar, their builders, and the
PyTorch modules made from them. Nothing here imports the rest of simpnet_cli."""
